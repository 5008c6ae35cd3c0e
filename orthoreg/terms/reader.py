"""The math of the reader-side weight penalty (formulas and layouts: ``orthoreg.reader.penalty``'s docstring; the engine
that applies them: ``orthoreg.reader.penalty.ReaderPenalty``): s²‖B(AVᵀ)‖²_F for LoRA and ‖WVᵀ − W₀Vᵀ‖²_F for full
fine-tuning, never forming ΔW, in float32 whatever the parameters' dtype, also inside ``torch.autocast`` regions.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["float32_math", "full_reader_penalty", "lora_reader_penalty", "weight_times_basis"]


def float32_math(device: torch.device):
    """Autocast off: the products below must run in float32 even inside a bf16/fp16 autocast region."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def lora_reader_penalty(lora_a: torch.Tensor, lora_b: torch.Tensor, basis: torch.Tensor, scaling: float) -> torch.Tensor:
    r""":math:`s^2\|B (A V^\top)\|_F^2 = \|\Delta W V^\top\|_F^2` for ΔW = s·B·A, without forming ΔW; float32.

    Args:
        lora_a (`torch.Tensor`): A, (r, d_in).
        lora_b (`torch.Tensor`): B, (d_out, r).
        basis (`torch.Tensor`): V, (k, d_in), orthonormal rows.
        scaling (`float`): s.
    """
    with float32_math(lora_b.device):
        v = basis.to(device=lora_a.device, dtype=torch.float32)
        a_v = lora_a.float() @ v.T  # (r, k)
        return float(scaling) ** 2 * (lora_b.float() @ a_v).square().sum()


def weight_times_basis(weight: torch.Tensor, basis: torch.Tensor, conv1d: bool = False) -> torch.Tensor:
    """W Vᵀ, (d_out, k) float32, for an ``nn.Linear`` weight (d_out, d_in) or, with ``conv1d``, a transformers
    ``Conv1D`` weight (d_in, d_out) (whose map is x ↦ x W, so its (d_out × d_in) matrix is Wᵀ: Wᵀ Vᵀ = (V W)ᵀ)."""
    with float32_math(weight.device):
        v = basis.to(device=weight.device, dtype=torch.float32)
        return (v @ weight.float()).T if conv1d else weight.float() @ v.T


def full_reader_penalty(weight: torch.Tensor, basis: torch.Tensor, base_product: torch.Tensor,
                        conv1d: bool = False) -> torch.Tensor:
    r""":math:`\|W V^\top - W_0 V^\top\|_F^2` with ``base_product`` = W₀Vᵀ (d_out, k) stored before training; float32.
    See ``weight_times_basis`` for the layouts."""
    with float32_math(weight.device):
        diff = weight_times_basis(weight, basis, conv1d) - base_product.to(device=weight.device, dtype=torch.float32)
        return diff.square().sum()
