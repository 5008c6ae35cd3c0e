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
    "covariance_penalty": "terms.penalties",
    "projection_penalty": "terms.penalties",
    "lora_weight_penalty": "terms.penalties",
    "HarmfulDirections": "directions.harmful",
    "DirectionsError": "directions.harmful",
    "OrthoRegConfig": "config",
    "OrthoRegularizer": "engine.regularizer",
    "OrthoRegCallback": "callback",
    "OrthoLoRA": "lora.wrapper",
    "extract_directions": "directions.extraction",
    "InputSubspaces": "reader.subspaces",
    "InputSubspacesError": "reader.subspaces",
    "extract_input_subspaces": "reader.extraction",
    "extract_template_subspaces": "reader.template",
    "overlap_score": "audit.overlap",
    "find_decoder_stack": "core.capture",
    "resolve_layers": "core.capture",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'orthoreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + ["__version__"]
