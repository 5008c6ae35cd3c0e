"""Which PEFT LoRA modules write into the residual stream, and whether OrthoLoRA can penalise them.

A *residual writer* is the last projection of a residual branch (attention's output projection, the MLP's down
projection): its output is added to the residual stream of its decoder layer, so its LoRA update ΔW moves that
stream along the layer's harmful directions U_ℓ exactly by U_ℓ ΔW. Found structurally (see
``find_residual_writers``), with conventional names only as a tie-break.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..core.capture import find_decoder_stack
from ..core.layers import check_plain_lora, is_linear_like, is_lora_layer, out_width

__all__ = ["RESIDUAL_WRITER_NAMES", "LoraWriter", "check_writer_supported", "find_residual_writers"]

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


def _structural_writers(layer: nn.Module, hidden_size: int) -> list[tuple[str, nn.Module]]:
    """(relative name, module) of the residual writers of one decoder layer, by the rule of
    ``find_residual_writers``."""
    found: list[tuple[str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        candidates = []
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            if is_linear_like(child):
                if out_width(child) == hidden_size:
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
                if out_width(module) != d:
                    raise ValueError(
                        f"`writer_modules` names {names[id(module)]!r}, which writes {out_width(module)} features, "
                        f"but the residual stream is {d} wide; name only modules whose output is added into it"
                    )
                writers.append(LoraWriter(names[id(module)], index, module))
            continue
        for _, module in _structural_writers(layer, d):
            if is_lora_layer(module):
                writers.append(LoraWriter(names[id(module)], index, module))
    return writers


def check_writer_supported(name: str, module: nn.Module, adapter: str) -> None:
    """Refuses LoRA forms whose update is not ΔW = s·B·A (see ``orthoreg.core.layers.check_plain_lora``)."""
    check_plain_lora(name, module, adapter, penalty="the weight-space penalty ‖U ΔW‖ = s‖(U B) A‖",
                     fix="set `lora_weight=0` to keep only the activation penalties")
