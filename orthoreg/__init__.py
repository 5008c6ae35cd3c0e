"""orthoreg: training-time geometric regularisers against safety drift and emergent misalignment.

Public API (the README documents each piece and its math): the loss terms ``covariance_penalty``/``projection_penalty``/
``lora_weight_penalty``, ``HarmfulDirections``, ``extract_directions``, ``InputSubspaces``/``extract_input_subspaces`` (the reader
term's V_m), ``OrthoRegConfig``, ``OrthoRegCallback``
(a ``transformers.TrainerCallback``), ``OrthoLoRA`` (a PEFT/accelerate wrapper) and ``overlap_score``.
Heavier modules are imported on first use, so ``import orthoreg`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "covariance_penalty": "penalties",
    "projection_penalty": "penalties",
    "lora_weight_penalty": "penalties",
    "HarmfulDirections": "directions",
    "DirectionsError": "directions",
    "OrthoRegConfig": "config",
    "OrthoRegularizer": "regularizer",
    "OrthoRegCallback": "callback",
    "OrthoLoRA": "lora",
    "extract_directions": "extraction",
    "InputSubspaces": "reader_subspaces",
    "InputSubspacesError": "reader_subspaces",
    "extract_input_subspaces": "reader_extraction",
    "extract_template_subspaces": "template_reader",
    "overlap_score": "audit",
    "find_decoder_stack": "capture",
    "resolve_layers": "capture",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'orthoreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + ["__version__"]
