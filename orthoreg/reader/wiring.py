"""The reader-side weight penalty in orthoreg's front doors: its input subspaces (given, read from a file, or recorded
from the built-in prompts when training starts), the ``ReaderPenalty`` of an ``OrthoRegConfig``, and what a
checkpoint folder carries for it (the subspaces; full fine-tuning's W₀V_mᵀ).

``input_subspaces="builtin"`` (the default of ``OrthoRegConfig.recommended()``): V_m are recorded on the model as it
is before any update — a PEFT adapter switched off — from orthoreg's built-in harmless requests at the chat
template's assistant-turn positions (``extract_template_subspaces``), with the trainer's tokenizer. One process
records them and every rank receives its tensors, so all ranks penalise the same V (under ZeRO-3 every rank runs the
recording forward, which is collective there, and rank 0's result is kept). The front door saves them in the run's
output folder and in each checkpoint (``SUBSPACES_FOLDER``), so a resumed run and later audits use the same V.

``OrthoRegCallback`` and ``OrthoLoRA`` both build their ``ReaderPenalty`` here. LoRA needs no saved state (ΔW = s·BA
is the update itself); full fine-tuning needs W₀V_mᵀ from the *start* of training, which a resumed run cannot
recompute from its (already updated) weights, so the front door writes it into every checkpoint folder as
safetensors (``READER_BASE_FILE``) and reads it back on resume (which folder that is, is the front door's business:
``OrthoRegCallback`` knows the Trainer's ``checkpoint-N`` layout).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..config import OrthoRegConfig
from ..core.distributed import run_on_main
from ..core.prompt_encoding import text_tokenizer
from ..core.zero3 import is_zero3_partitioned
from .penalty import ReaderPenalty
from .subspaces import InputSubspaces
from .template import extract_template_subspaces

__all__ = [
    "BUILTIN_PROMPT_SET",
    "READER_BASE_FILE",
    "SUBSPACES_FOLDER",
    "check_restored_base",
    "configured_subspaces",
    "reader_penalty_for",
    "record_builtin_subspaces",
    "restore_reader_base",
    "save_reader_base",
    "saved_subspaces",
]

READER_BASE_FILE = "orthoreg_reader_base.safetensors"
SUBSPACES_FOLDER = "orthoreg_input_subspaces"
BUILTIN_PROMPT_SET = "orthoreg builtin harmless (train)"


def configured_subspaces(config: OrthoRegConfig, input_subspaces: Any = None) -> InputSubspaces | None:
    """The reader term's V_m as far as they are known before training: ``input_subspaces`` when given, else the
    file, folder or Hub repo of ``config.input_subspaces``; ``None`` when the weight is 0 or they are ``"builtin"``
    (recorded when training starts, ``record_builtin_subspaces``).

    Raises:
        TypeError: ``input_subspaces`` is not an ``InputSubspaces``.
        FileNotFoundError, InputSubspacesError: ``config.input_subspaces`` names nothing readable.
    """
    if config.reader_weight == 0:
        return None
    if input_subspaces is not None:
        if not isinstance(input_subspaces, InputSubspaces):
            raise TypeError(f"`input_subspaces` must be an orthoreg.InputSubspaces; got "
                            f"{type(input_subspaces).__name__}")
        return input_subspaces
    if config.uses_builtin_subspaces:
        return None
    return InputSubspaces.from_pretrained(config.input_subspaces)


def record_builtin_subspaces(model: nn.Module, tokenizer: Any, config: OrthoRegConfig) -> InputSubspaces:
    """V_m of ``input_subspaces="builtin"`` on every rank (module docstring): the template-reader constraint's
    subspaces of the modules that train (``config.reader_targets``, k = ``config.reader_k``), from the built-in
    harmless requests. Call it before the first update, on every rank.

    Raises:
        ValueError: no tokenizer (the fix: pass ``processing_class=`` / ``tokenizer=``).
        InputSubspacesError: the tokenizer has no chat template, or no module matches.
        RuntimeError: the recording failed on the main process (its error is named on every rank).
    """
    from ..core.prompts import load_builtin

    tokenizer = text_tokenizer(tokenizer)
    if tokenizer is None:
        raise ValueError(
            "input_subspaces='builtin' records V_m with the model's chat template, but no tokenizer was given: pass "
            "`processing_class=tokenizer` to the Trainer (or `tokenizer=` to OrthoLoRA), or record them yourself "
            "(`orthoreg subspaces extract --model … --out DIR`) and set `input_subspaces=DIR`"
        )

    def record() -> InputSubspaces:
        subspaces = extract_template_subspaces(model, tokenizer, load_builtin("train").harmless, k=config.reader_k,
                                               targets=config.reader_targets, trainable_only=True,
                                               prompt_set=BUILTIN_PROMPT_SET)
        # On the CPU: what is sent to the other ranks must not depend on the main process's device.
        return InputSubspaces({n: v.cpu() for n, v in subspaces.items()}, metadata=subspaces.metadata)

    return run_on_main(record, "recording the built-in input subspaces",
                       every_rank=is_zero3_partitioned(model))  # a ZeRO-3 forward is collective


def saved_subspaces(folder: str) -> InputSubspaces | None:
    """The input subspaces a front door saved in ``folder`` (a run's output folder or a checkpoint), if any."""
    path = os.path.join(folder, SUBSPACES_FOLDER)
    return InputSubspaces.from_pretrained(path) if os.path.isdir(path) else None


def reader_penalty_for(config: OrthoRegConfig, input_subspaces: InputSubspaces | None, mode: str) -> ReaderPenalty | None:
    """The ``ReaderPenalty`` of ``config.reader_weight`` (in ``config.units``) over ``input_subspaces`` (``None``
    when the weight is 0 or the subspaces are not known yet)."""
    if config.reader_weight == 0 or input_subspaces is None:
        return None
    # Checked once per optimizer step by the owner (OrthoRegCallback.on_pre_optimizer_step, OrthoLoRA.check_step),
    # like the activation terms: no host sync in the forward.
    return ReaderPenalty(input_subspaces, config.reader_weight, mode=mode, check="step", units=config.units)


def save_reader_base(reader: ReaderPenalty, folder: str) -> None:
    """Writes full fine-tuning's W₀V_mᵀ into the checkpoint ``folder`` (nothing for LoRA, or when the folder does not
    exist). Call it on the main process only."""
    base = reader.reference_state()
    if base and os.path.isdir(folder):
        from safetensors.torch import save_file

        save_file(base, os.path.join(folder, READER_BASE_FILE), metadata={"format": "orthoreg-reader-base-1"})


def restore_reader_base(reader: ReaderPenalty, folder: str) -> str | None:
    """Before attaching on a resumed run: reads W₀V_mᵀ back from the checkpoint ``folder``. Returns the path it
    looked for when there is none (fine for LoRA; see ``check_restored_base`` once attached)."""
    path = os.path.join(folder, READER_BASE_FILE)
    if not os.path.isfile(path):
        return path
    from safetensors.torch import load_file

    reader.load_reference_state(load_file(path))
    return None


def check_restored_base(reader: ReaderPenalty, missing: str | None) -> None:
    """Refuses a resumed full fine-tune whose W₀V_mᵀ could not be read back from ``missing``: recording it from the
    resumed weights would anchor the penalty to the wrong model.

    Raises:
        ValueError: naming the file and the fix.
    """
    path = missing
    full = [m.name for m in reader.modules if m.kind == "full"]
    if path is not None and full:
        reader.detach()
        raise ValueError(
            f"resuming a full fine-tune with the reader penalty, but {path!r} does not exist: W₀V_mᵀ of the base "
            f"model ({full[:3]}{' …' if len(full) > 3 else ''}) cannot be recomputed from the resumed weights. Resume "
            "from a checkpoint that OrthoRegCallback wrote under this output_dir, or start from step 0."
        )
