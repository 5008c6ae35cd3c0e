"""Facts about the linear layers orthoreg's weight terms read: PEFT LoRA layers, ``nn.Linear`` and transformers'
``Conv1D``, their widths, their adapter state, and whether their weights are sharded at the moment.

One neutral module for both weight-space wings (the LoRA writer term in ``orthoreg.lora`` and the reader term in
``orthoreg.reader``), so that neither has to import the other. Widths are read from attributes, never from weight
shapes: under DeepSpeed ZeRO-3 a weight outside its gathered region is a partitioned empty tensor.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = [
    "DECODER_PROJECTIONS",
    "active_lora_adapter",
    "check_adapter_state",
    "check_gathered",
    "check_plain_lora",
    "in_width",
    "is_conv1d",
    "is_linear_like",
    "is_lora_layer",
    "is_sharded",
    "lora_layers",
    "out_width",
]

# The seven linear projections of a Llama-family decoder layer (attention and MLP), by module name suffix: what the
# benchmarks' LoRA fine-tunes and the audit's dry run adapt.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (``peft.tuners.lora.LoraLayer``) of any base module type."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear map whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, ``Conv1D``, or either one wrapped by PEFT LoRA."""
    return is_lora_layer(module) or isinstance(module, nn.Linear) or is_conv1d(module)


def in_width(module: nn.Module) -> int | None:
    """d_in of a linear-like module, else ``None``."""
    if is_lora_layer(module):
        return getattr(module, "in_features", None)
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.nx
    return None


def out_width(module: nn.Module) -> int | None:
    """d_out of a linear-like module, else ``None``."""
    if is_lora_layer(module):
        return getattr(module, "out_features", None)
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.nf
    return None


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every PEFT LoRA layer of ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if is_lora_layer(m)]


def is_sharded(weight: torch.Tensor) -> bool:
    """The weight is only this rank's shard right now (ZeRO-3 partition outside its gathered region, or an FSDP2
    ``DTensor`` outside the unsharded forward), so a formula that needs the whole matrix cannot use it."""
    if weight.numel() == 0:
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(weight, dtensor.DTensor)


def check_gathered(name: str, *weights: torch.Tensor) -> None:
    """Refuses weights that are sharded during the module's own forward.

    Raises:
        RuntimeError: naming the module and the fix for ZeRO-3 and FSDP2.
    """
    if any(is_sharded(w) for w in weights):
        w = weights[0]
        raise RuntimeError(
            f"the weights of {name!r} are sharded during its own forward (shape {tuple(w.shape)}, "
            f"{type(w).__name__}), so the reader penalty cannot be computed there. Under DeepSpeed ZeRO-3 attach "
            "after `import deepspeed` (A and B are then registered as the module's external parameters); with FSDP2 "
            "shard whole decoder layers, not single linear modules."
        )


def check_adapter_state(name: str, module: nn.Module) -> str | None:
    """The single active adapter of ``module`` (``None`` if it has no active adapter on this module).

    Raises:
        ValueError: merged adapters or several active adapters.
    """
    if getattr(module, "merged", False):
        raise ValueError(
            f"the LoRA adapter of {name!r} is merged into the base weights ({module.merged_adapters}); merged "
            "adapters have no separate A and B to regularise or train. Call `peft_model.unmerge_adapter()` first."
        )
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        raise ValueError(
            f"{name!r} has several active LoRA adapters {active}; OrthoLoRA regularises one adapter. Activate one "
            "with `peft_model.set_adapter(name)` (or `base_model.set_adapter(name)`)."
        )
    return active[0] if active else None


def check_plain_lora(name: str, module: nn.Module, adapter: str, penalty: str, fix: str) -> None:
    """Refuses LoRA forms whose update is not ΔW = s·B·A with plain ``nn.Linear`` A and B: a ``lora_variant``
    (DoRA rescales columns by a learned magnitude), ``lora_bias`` (the update also shifts the bias), or A/B of
    another layer type. ``penalty`` names the term that needs the plain form, ``fix`` what the user can do.

    Raises:
        NotImplementedError: naming the module, the form and ``fix``.
    """
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise NotImplementedError(
            f"{name!r} uses the LoRA variant {type(variant).__name__} (e.g. DoRA, `use_dora=True`): its update is "
            f"not s·B·A (DoRA rescales columns by a learned magnitude), so {penalty} would be wrong. It supports "
            f"plain LoRA and rsLoRA; {fix}, or train without the variant."
        )
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise NotImplementedError(
            f"{name!r} has `lora_bias=True`: the update also shifts the bias, which {penalty} does not cover. Use "
            f"`LoraConfig(lora_bias=False)`, or {fix}."
        )
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
        raise NotImplementedError(
            f"{name!r} is a {type(module).__name__} whose lora_A/lora_B are {type(lora_a).__name__}/"
            f"{type(lora_b).__name__}; {penalty} supports LoRA on nn.Linear and transformers' Conv1D only"
        )


def active_lora_adapter(name: str, module: nn.Module) -> str | None:
    """The single active adapter of a PEFT ``LoraLayer`` the reader penalty reads (``None`` if none is active).

    Raises:
        ValueError: merged adapters, or several active adapters.
        NotImplementedError: a form whose update is not ΔW = s·B·A (see ``check_plain_lora``).
    """
    adapter = check_adapter_state(name, module)
    if adapter is not None:
        check_plain_lora(name, module, adapter, penalty="the reader penalty s²‖B(AVᵀ)‖²",
                         fix="leave this module out of the reader penalty")
    return adapter
