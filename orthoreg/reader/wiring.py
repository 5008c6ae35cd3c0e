"""The reader-side weight penalty in orthoreg's front doors: building it from an ``OrthoRegConfig``, and writing /
reading full fine-tuning's W₀V_mᵀ in a checkpoint folder.

``OrthoRegCallback`` and ``OrthoLoRA`` both build their ``ReaderPenalty`` here. LoRA needs no saved state (ΔW = s·BA
is the update itself); full fine-tuning needs W₀V_mᵀ from the *start* of training, which a resumed run cannot
recompute from its (already updated) weights, so the front door writes it into every checkpoint folder as
safetensors (``READER_BASE_FILE``) and reads it back on resume (which folder that is, is the front door's business:
``OrthoRegCallback`` knows the Trainer's ``checkpoint-N`` layout).
"""

from __future__ import annotations

import os
from typing import Any

from ..config import OrthoRegConfig
from .penalty import InputSubspaces, ReaderPenalty

__all__ = ["READER_BASE_FILE", "check_restored_base", "reader_penalty_for", "restore_reader_base", "save_reader_base"]

READER_BASE_FILE = "orthoreg_reader_base.safetensors"


def reader_penalty_for(config: OrthoRegConfig, input_subspaces: Any, mode: str) -> ReaderPenalty | None:
    """The ``ReaderPenalty`` of ``config.reader_weight`` over ``input_subspaces`` (``None`` when the weight is 0).

    Raises:
        ValueError: ``reader_weight > 0`` without input subspaces. TypeError: not an ``InputSubspaces``.
    """
    if config.reader_weight == 0:
        return None
    if input_subspaces is None:
        raise ValueError(
            "OrthoRegConfig(reader_weight > 0) needs the input subspaces V_m of the penalised modules: pass "
            "`input_subspaces=` (orthoreg.extract_input_subspaces(...) or InputSubspaces.load(path)), or set "
            "reader_weight=0"
        )
    if not isinstance(input_subspaces, InputSubspaces):
        raise TypeError(f"`input_subspaces` must be an orthoreg.InputSubspaces; got "
                        f"{type(input_subspaces).__name__}")
    # Checked once per optimizer step by the owner (OrthoRegCallback.on_pre_optimizer_step, OrthoLoRA.check_step),
    # like the activation terms: no host sync in the forward.
    return ReaderPenalty(input_subspaces, config.reader_weight, mode=mode, check="step")


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
