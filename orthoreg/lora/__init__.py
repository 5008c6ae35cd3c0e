"""``OrthoLoRA``: the accelerate-aware PEFT LoRA front door, and the writer-side weight term of LoRA updates.

One module a role:

- ``wrapper``: ``OrthoLoRA`` (attach to a PEFT model, optionally an ``Accelerator``; the activation, writer and reader
  terms of one forward);
- ``writers``: which LoRA modules write into the residual stream (found structurally) and which forms are supported;
- ``weight_term``: the writer term λ_lora·Σ ‖U_ℓ ΔW‖²_F = s²‖(U_ℓ B) A‖²_F, its session and hooks;
- ``io``: ``save_pretrained``/``from_pretrained`` of the wrapper's config, directions and input subspaces.
"""

from .io import load_ortholora, save_ortholora
from .weight_term import WriterPenaltyHooks, WriterSession, select_penalized_writers
from .wrapper import OrthoLoRA
from .writers import RESIDUAL_WRITER_NAMES, LoraWriter, check_writer_supported, find_residual_writers

__all__ = [
    "RESIDUAL_WRITER_NAMES",
    "LoraWriter",
    "OrthoLoRA",
    "WriterPenaltyHooks",
    "WriterSession",
    "check_writer_supported",
    "find_residual_writers",
    "load_ortholora",
    "save_ortholora",
    "select_penalized_writers",
]
