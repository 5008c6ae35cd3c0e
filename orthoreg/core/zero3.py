"""DeepSpeed ZeRO-3 external parameters: the one place that registers them.

A term computed inside a module's forward from parameters that ZeRO-3 does not gather for that module (LoRA's A
and B read from the LoRA layer's own forward hook) must be registered as the module's *external* parameters, so
that ZeRO-3 gathers them for its forward and backward. ``deepspeed.zero`` is an attribute of the ``deepspeed``
package, not an importable submodule in every release (0.19.8: ``from deepspeed.zero import …`` raises
ImportError), so it is reached as an attribute.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn

__all__ = ["is_zero3_partitioned", "register_external_parameters"]


def register_external_parameters(module: nn.Module, parameters: Iterable[nn.Parameter]) -> bool:
    """Registers ``parameters`` as ZeRO-3 external parameters of ``module``; False when DeepSpeed is not loaded
    (nothing to do: without DeepSpeed imported no ZeRO-3 engine can exist)."""
    deepspeed = sys.modules.get("deepspeed")
    register = getattr(getattr(deepspeed, "zero", None), "register_external_parameter", None)
    if register is None:
        return False
    for parameter in parameters:
        register(module, parameter)
    return True


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are partitioned by DeepSpeed ZeRO-3 (each then carries a ``ds_id``): its
    forward is then collective, so every rank must run it together."""
    return "deepspeed" in sys.modules and any(hasattr(p, "ds_id") for p in model.parameters())
