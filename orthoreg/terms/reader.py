r"""The reader-side weight penalty's math: keep a fine-tune from changing how each adapted module *reads* a subspace.

For an adapted linear module m with input width d_in and an orthonormal basis V_m (k × d_in) of its inputs on
chosen prompts and positions (``InputSubspaces``, recorded once on the base model):

.. math::

    \text{LoRA:}\quad \mathrm{reader}(m) = \|\Delta W_m V_m^\top\|_F^2 = s_m^2\,\|B_m (A_m V_m^\top)\|_F^2
    \qquad\qquad
    \text{full FT:}\quad \mathrm{reader}(m) = \|W_m V_m^\top - W_{0,m} V_m^\top\|_F^2

with A_m (r × d_in) = ``lora_A[a].weight``, B_m (d_out × r) = ``lora_B[a].weight``, s_m = ``scaling[a]``
(α/r, or α/√r with rsLoRA), ΔW_m = s_m B_m A_m never formed (cost d_out·r·k); W_m the module's weight in
(d_out × d_in) layout and W_{0,m}V_mᵀ (d_out × k, float32) stored from the unmodified weights. GPT-2's ``Conv1D``
stores its weight (d_in × d_out) and LoRA's A and B unchanged (``fan_in_fan_out`` transposes only ΔW's layout), so
both formulas hold as written. The term added to the training objective is λ·Σ_m reader(m) (``units="absolute"``).

**Base-model units** (``units="base"``): each module's term is relative to how the base model reads span(V_m), and
the modules are averaged, so one λ means the same on any model size:

.. math::

    \mathrm{reader}_{\text{base}} = \frac{1}{M}\sum_m \frac{\mathrm{reader}(m)}{\|W_{0,m} V_m^\top\|_F^2}

over the M penalised modules, W_{0,m} the frozen base weight (LoRA) or the weight recorded before the first update
(full FT). A module whose base read-out is ~0 (below ``BASE_READOUT_FLOOR`` times what a random k-dimensional
subspace would read, ‖W₀‖²_F·k/d_in: ``base_readout``) is refused by name rather than divided by it.

All of it is float32 math whatever the parameters' dtype, also inside ``torch.autocast`` regions. The engine that
applies it to a model: ``orthoreg.reader.penalty.ReaderPenalty``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["BASE_READOUT_FLOOR", "base_readout", "float32_math", "full_reader_penalty", "lora_reader_penalty",
           "weight_times_basis"]

# A base read-out ‖W₀Vᵀ‖²_F below this fraction of a random subspace's expected read-out (‖W₀‖²_F·k/d_in) is "~0".
BASE_READOUT_FLOOR = 1e-6


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


def base_readout(weight: torch.Tensor, basis: torch.Tensor, conv1d: bool = False,
                 base_product: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(:math:`\|W_0 V^\top\|_F^2`, :math:`\|W_0\|_F^2 k / d_{in}`): the base read-out of span(V), the denominator of
    the base-units term, and what a random k-dimensional subspace would read (its expectation), the yardstick of
    ``BASE_READOUT_FLOOR``. ``base_product`` (W₀Vᵀ) is used when already computed; float32."""
    with float32_math(weight.device):
        product = weight_times_basis(weight, basis, conv1d) if base_product is None else base_product.float()
        random_readout = weight.float().square().sum() * basis.shape[0] / basis.shape[1]
        return product.square().sum(), random_readout
