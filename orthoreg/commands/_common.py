"""Shared pieces of the ``orthoreg`` subcommands: model loading, device/dtype/revision flags, output-path checks,
layer parsing, error exits."""

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
                        help="weights dtype; 'auto' = the checkpoint's own dtype, as transformers' "
                             "from_pretrained(dtype='auto')")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a Hub model (passed to from_pretrained of model and tokenizer)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repo's own Python code (off by default: only do this for repos you trust)")
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


def check_output_dir(path: str, what: str = "output folder") -> None:
    """Refuses, before any model is loaded, an output folder that cannot be created or written: the path is a file,
    or its nearest existing ancestor is not a writable folder. Nothing is created here.

    Raises:
        NotADirectoryError, PermissionError: naming the path and the fix.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"the {what} {path!r} is a file; give a folder path")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"cannot create the {what} {path!r}: {existing!r} is a file")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write the {what} {path!r}: {existing!r} is not writable; choose another path")


def load_model(
    path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: bool = True,
    quiet: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` (safetensors only) in eval mode on ``device``, and its tokenizer.

    ``dtype="auto"`` keeps the checkpoint's dtype (transformers' ``dtype="auto"``); ``revision`` and
    ``trust_remote_code`` (off by default) go to both ``from_pretrained`` calls. ``quiet`` turns off transformers'
    progress bars for the rest of the process (a CLI run is one process).

    Raises:
        CommandError: the model or tokenizer cannot be loaded, with the reason.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()

    if dtype not in DTYPES:
        raise CommandError(f"--dtype must be one of {DTYPES}; got {dtype!r}")
    target = resolve_device(device)
    hub = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, dtype="auto" if dtype == "auto" else getattr(torch, dtype), **hub
        )
        tok = AutoTokenizer.from_pretrained(path, **hub) if tokenizer else None
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
