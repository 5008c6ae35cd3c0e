"""Which PEFT LoRA modules write into the residual stream, and whether OrthoLoRA can penalise them.

A *residual writer* is the last projection of a residual branch (attention's output projection, the MLP's down
projection): its output is added to the residual stream of its decoder layer, so its LoRA update ΔW moves that
stream along the layer's harmful directions U_ℓ exactly by U_ℓ ΔW. Found structurally (see
``find_residual_writers``), with conventional names only as a tie-break.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.capture import find_decoder_stack

__all__ = [
    "is_conv1d",
    "is_lora_layer",
    "LoraWriter",
    "RESIDUAL_WRITER_NAMES",
    "check_adapter_state",
    "check_writer_supported",
    "find_residual_writers",
    "is_sharded",
    "lora_layers",
    "active_lora_adapter",
    "check_gathered",
]

# Conventional names of the last projection of a residual branch. Only a tie-break inside the structural rule (see
# ``find_residual_writers``): a parent block with several width-d projections picks the one with a known name.
RESIDUAL_WRITER_NAMES = (
    "o_proj", "out_proj", "dense", "c_proj", "down_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo",
)


@dataclass(frozen=True)
class LoraWriter:
    """A LoRA module that writes into the residual stream of decoder layer ``layer``.

    Attributes:
        name: qualified name inside the PEFT model (e.g. ``base_model.model.model.layers.3.mlp.down_proj``).
        layer: index ℓ of the decoder layer that contains it; it is penalised with U_ℓ.
        module: the PEFT ``LoraLayer``.
    """

    name: str
    layer: int
    module: nn.Module


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


def _is_linear_like(module: nn.Module) -> bool:
    return is_lora_layer(module) or isinstance(module, nn.Linear) or is_conv1d(module)


def _out_width(module: nn.Module) -> int | None:
    # Attributes, not weight shapes: under ZeRO-3 a weight may already be a partitioned empty tensor.
    if is_lora_layer(module):
        return getattr(module, "out_features", None)
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.nf
    return None


def _structural_writers(layer: nn.Module, hidden_size: int) -> list[tuple[str, nn.Module]]:
    """(relative name, module) of the residual writers of one decoder layer, by the rule of
    ``find_residual_writers``."""
    found: list[tuple[str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        candidates = []
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            if _is_linear_like(child):
                if _out_width(child) == hidden_size:
                    candidates.append((child_name, name, child))
            else:
                visit(child, name + ".")
        if not candidates:
            return
        named = [c for c in candidates if c[0] in RESIDUAL_WRITER_NAMES]
        _, name, module = (named or candidates)[-1]
        found.append((name, module))

    visit(layer, "")
    return found


def find_residual_writers(
    model: nn.Module, writer_modules: Sequence[str] | None = None, layers_path: str | None = None
) -> list[LoraWriter]:
    """The LoRA modules of ``model`` that write into the residual stream, with the decoder layer of each.

    **Rule (structural, no per-family table).** Inside decoder layer ℓ (found by ``find_decoder_stack``), every
    module P groups its *linear-like* direct children (``nn.Linear``, transformers' ``Conv1D``, either one wrapped by
    PEFT); among those whose output width equals the hidden size d, the last one in registration order — which in
    Hugging Face models is execution order — is the projection that ends P's residual branch and is added into the
    residual stream. If several of them carry a conventional writer name (``RESIDUAL_WRITER_NAMES``), the last of those
    wins (so a width-d attention gate registered after ``o_proj`` is not taken). This finds ``self_attn.o_proj`` and
    ``mlp.down_proj`` (Llama, Mistral, Qwen2, Phi3, Gemma), ``attn.c_proj`` and ``mlp.c_proj`` (GPT-2 ``Conv1D``),
    ``attention.dense`` and ``mlp.dense_4h_to_h`` (GPT-NeoX), ``fc2`` (OPT, on the layer itself) and each MoE
    expert's down projection. A writer is penalised only if it carries a LoRA adapter. Caveats: a block that
    normalises its output before the residual add (Gemma2/3 ``post_*_layernorm``) makes the output-space penalty a
    proxy; a block with two genuine writers as direct children of one parent yields only the last. For such models
    pass ``writer_modules``.

    Args:
        model: a PEFT model (or anything whose decoder layers contain PEFT ``LoraLayer`` modules).
        writer_modules (`Sequence[str]`, *optional*): overrides the rule: a LoRA module inside a decoder layer is a
            writer iff its qualified name ends with one of these (``"o_proj"``, ``"mlp.down_proj"``, …); each must
            write d features.
        layers_path (`str`, *optional*): as in ``OrthoRegConfig.layers_path``.

    Returns:
        The writers in model order. LoRA modules outside the decoder layers (embeddings, LM head) are never writers.
    """
    stack = find_decoder_stack(model, layers_path=layers_path)
    d = stack.hidden_size
    names = {id(m): n for n, m in model.named_modules()}
    writers: list[LoraWriter] = []
    for index, layer in enumerate(stack.layers):
        if writer_modules is not None:
            for rel, module in layer.named_modules():
                if not is_lora_layer(module) or not any(rel == s or rel.endswith("." + s) for s in writer_modules):
                    continue
                if _out_width(module) != d:
                    raise ValueError(
                        f"`writer_modules` names {names[id(module)]!r}, which writes {_out_width(module)} features, "
                        f"but the residual stream is {d} wide; name only modules whose output is added into it"
                    )
                writers.append(LoraWriter(names[id(module)], index, module))
            continue
        for _, module in _structural_writers(layer, d):
            if is_lora_layer(module):
                writers.append(LoraWriter(names[id(module)], index, module))
    return writers


# ---------------------------------------------------------------------------------------------------- validation
def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_lora_layer(m)]


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


def check_writer_supported(name: str, module: nn.Module, adapter: str) -> None:
    """Refuses LoRA forms whose update is not ΔW = s·B·A with plain ``nn.Linear`` A and B."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise NotImplementedError(
            f"{name!r} uses the LoRA variant {type(variant).__name__} (e.g. DoRA, `use_dora=True`): its update is "
            "not s·B·A (DoRA rescales columns by a learned magnitude), so ‖U ΔW‖ = s‖(U B) A‖ would be wrong. The "
            "weight-space penalty supports plain LoRA and rsLoRA; set `lora_weight=0` to keep only the activation "
            "penalties, or train without the variant."
        )
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise NotImplementedError(
            f"{name!r} has `lora_bias=True`: the update also shifts the bias, which the weight-space penalty does not "
            "cover. Use `LoraConfig(lora_bias=False)` or set `lora_weight=0`."
        )
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
        raise NotImplementedError(
            f"{name!r} is a {type(module).__name__} whose lora_A/lora_B are {type(lora_a).__name__}/"
            f"{type(lora_b).__name__}; the weight-space penalty supports LoRA on nn.Linear and transformers' Conv1D "
            "(fan_in_fan_out) residual writers only"
        )


def is_sharded(weight: torch.Tensor) -> bool:
    if weight.numel() == 0:  # DeepSpeed ZeRO-3 partitioned parameter outside a gathered region
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(weight, dtensor.DTensor)  # FSDP2 shard outside the unsharded forward


def active_lora_adapter(name: str, module: nn.Module) -> str | None:
    """The single active adapter of a PEFT ``LoraLayer`` (``None`` if none is active on it).

    Raises:
        ValueError: merged adapters, or several active adapters.
        NotImplementedError: DoRA / another ``lora_variant``, ``lora_bias``, or lora_A/lora_B that are not
            ``nn.Linear`` — forms whose update is not ΔW = s·B·A.
    """
    adapter = check_adapter_state(name, module)  # merged or several active adapters: refused there
    if adapter is None:
        return None
    if getattr(module, "lora_variant", {}).get(adapter) is not None:
        raise NotImplementedError(
            f"{name!r} uses the LoRA variant {type(module.lora_variant[adapter]).__name__} (e.g. DoRA): its update "
            "is not s·B·A, so s²‖B(AVᵀ)‖² would be wrong. The reader penalty supports plain LoRA and rsLoRA."
        )
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise NotImplementedError(
            f"{name!r} has `lora_bias=True`: the update also shifts the bias, which ‖ΔW Vᵀ‖² does not cover. Use "
            "LoraConfig(lora_bias=False)."
        )
    if not (isinstance(module.lora_A[adapter], nn.Linear) and isinstance(module.lora_B[adapter], nn.Linear)):
        raise NotImplementedError(
            f"{name!r} is a {type(module).__name__}; the reader penalty supports LoRA on nn.Linear and Conv1D only"
        )
    return adapter


def check_gathered(name: str, *weights: torch.Tensor) -> None:
    if any(is_sharded(w) for w in weights):
        w = weights[0]
        raise RuntimeError(
            f"the weights of {name!r} are sharded during its own forward (shape {tuple(w.shape)}, "
            f"{type(w).__name__}), so the reader penalty cannot be computed there. Under DeepSpeed ZeRO-3 attach "
            "after `import deepspeed` (A and B are then registered as the module's external parameters); with FSDP2 "
            "shard whole decoder layers, not single linear modules."
        )
