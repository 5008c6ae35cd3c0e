"""Shared pieces of the ``orthoreg`` subcommands: model loading, device/dtype flags, layer parsing, error exits."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where the model runs: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', …")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype; 'auto' = bfloat16 on a GPU that supports it, float32 otherwise")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest sequence in tokens (default: the model's context length)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_layers(text: str | None) -> Any:
    """``"3,5,-1"`` → ``[3, 5, -1]``; ``"middle_third"``/``"2/3:"`` stay strings (see ``resolve_layers``)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    parsed = [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    return parsed[0] if len(parsed) == 1 else parsed


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(
    path: str, *, device: str = "auto", dtype: str = "auto", tokenizer: bool = True, quiet: bool = False
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` (safetensors only, no remote code) in eval mode on ``device``, and its tokenizer.
    ``quiet`` turns off transformers' progress bars for the rest of the process (a CLI run is one process).

    Raises:
        CommandError: the model or tokenizer cannot be loaded, with the reason.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()

    target = resolve_device(device)
    if dtype == "auto":
        cuda_bf16 = target.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if cuda_bf16 else "float32"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, dtype=getattr(torch, dtype)
        )
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if tokenizer else None
    except (OSError, ValueError) as err:
        hint = "" if os.path.isdir(path) else " (not a local directory; hub names need network access)"
        raise CommandError(f"cannot load the model {path!r}{hint}: {err}") from err
    return model.to(target).eval(), tok


class CommandError(RuntimeError):
    """A user-facing failure of a subcommand; printed as one ``error:`` line, exit status 2."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types a subcommand reports as one ``error: …`` line: bad input and bad options. Every orthoreg
    input error (``DirectionsError``, ``PromptSetError``, ``ExtractionError``, ``TaskDataError``, a bad layer
    selection) is a ``ValueError``; ``OSError`` covers missing or unwritable files. Anything else is a bug and keeps
    its traceback."""
    return CommandError, ValueError, OSError


def fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_ERROR
