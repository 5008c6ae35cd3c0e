"""The loss terms of orthoreg as pure tensor functions (their exact formulas are in each docstring and the README).

Every function selects the rows of ``h`` where ``mask`` is true, casts them to float32 (whatever the training
dtype), and returns a 0-dim float32 tensor that is exactly 0 — with zero, finite gradients — when nothing is
selected. Nothing here knows about models, hooks or trainers.
"""

from __future__ import annotations

import torch

from .covariance import (
    COV_BACKWARD_MATMULS,
    COV_FORWARD_MATMULS,
    DOMINANT_COLUMNS,
    GRAM_CONDITION_LIMIT,
    covariance_and_condition,
    covariance_from_index,
    covariance_penalty,
)
from .distributed_rows import all_reduce_sum, data_parallel_world, gather_rows
from .token_rows import no_autocast, rows_at, rows_gradient, scaled_factor, select_tokens, selected_index

# The terms live in one module each (covariance, the projection and LoRA terms here); their shared groundwork in
# token_rows and distributed_rows. Everything is importable from here, as before.
__all__ = [
    "COV_BACKWARD_MATMULS",
    "COV_FORWARD_MATMULS",
    "DOMINANT_COLUMNS",
    "GRAM_CONDITION_LIMIT",
    "all_reduce_sum",
    "covariance_and_condition",
    "covariance_from_index",
    "covariance_penalty",
    "data_parallel_world",
    "gather_rows",
    "lora_weight_penalty",
    "no_autocast",
    "projection_from_index",
    "projection_penalty",
    "select_tokens",
    "selected_index",
]


class _Projection(torch.autograd.Function):
    r"""Σ_rows ‖e‖² / N with e = U x − anchor (clamped at 0 when one-sided), closed-form backward 2 e U / N.

    Saves ``h`` (kept alive by the model anyway), the indices, U and e (N×k); never the (N, d) float32 rows.
    """

    @staticmethod
    def forward(ctx, h, index, u, anchor, one_sided):
        with no_autocast(h.device):
            return _Projection._forward(ctx, h, index, u, anchor, one_sided)

    @staticmethod
    def _forward(ctx, h, index, u, anchor, one_sided):
        x = rows_at(h, index)
        n = x.shape[0]
        ctx.h_meta = (h.shape, h.dtype, h.device)
        ctx.n = n
        if n == 0:
            return x.new_zeros(())
        e = x @ u.T  # (N, k)
        del x
        if anchor is not None:
            e = e - anchor
        if one_sided:
            e = e.clamp(min=0)
        ctx.save_for_backward(h, index, u, e)
        return e.square().sum() / n

    @staticmethod
    def backward(ctx, grad):
        with no_autocast(grad.device):
            return _Projection._backward(ctx, grad.float())

    @staticmethod
    def _backward(ctx, grad):
        if ctx.n == 0:
            shape, dtype, device = ctx.h_meta
            return torch.zeros(shape, dtype=dtype, device=device), None, None, None, None
        h, index, u, e = ctx.saved_tensors
        gx = scaled_factor(e, grad * (2.0 / ctx.n)) @ u  # d/de of max(e, 0)² is 2 max(e, 0): the same formula
        return rows_gradient(gx, h, index), None, None, None, None


def projection_penalty(
    h: torch.Tensor,
    directions: torch.Tensor,
    mask: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    one_sided: bool = False,
) -> torch.Tensor:
    r"""Projection of the selected hidden states onto a harmful subspace, in one of three anchors.

    ``directions`` is U (k, d) with orthonormal rows; x ranges over the selected rows of ``h``:

    - ``reference=None`` (absolute): :math:`\mathrm{mean}_x \|U x\|^2`
    - ``reference=r`` of shape (k,) (recorded base statistics): :math:`\mathrm{mean}_x \|U x - r\|^2`
    - ``reference=h_ref`` of ``h``'s shape (paired base activations on the same tokens):
      :math:`\mathrm{mean}_x \|U (x - x_{ref})\|^2`

    ``one_sided=True`` penalises only movement toward the harmful side, i.e. each coordinate
    :math:`e_j = (Ux - \text{anchor})_j` enters as :math:`\max(e_j, 0)^2` (rows of U point from harmless to harmful).
    The reference is a constant: no gradient flows into it.

    Args:
        h (`torch.Tensor`): hidden states (B, T, d) or (N, d).
        directions (`torch.Tensor`): U, (k, d), orthonormal rows.
        mask (`torch.Tensor`, *optional*): boolean (B, T) selection.
        reference (`torch.Tensor`, *optional*): ``None``, r (k,), or h_ref (same shape as ``h``).
        one_sided (`bool`, *optional*, defaults to `False`).

    Returns:
        A 0-dim float32 tensor; exactly 0 when no row is selected.
    """
    if directions.dim() != 2 or directions.shape[1] != h.shape[-1]:
        raise ValueError(
            f"directions must be (k, d) with d = {h.shape[-1]} (the hidden size); got {tuple(directions.shape)}. "
            "Extract or load directions for this model."
        )
    if h.dim() < 2:
        raise ValueError(f"hidden states must be (B, T, d) or (N, d); got shape {tuple(h.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden states are {tuple(h.shape)}")
    u = directions.to(device=h.device, dtype=torch.float32)
    index = selected_index(None if mask is None else mask.to(h.device))
    if reference is not None:
        reference = reference.detach()
        if reference.dim() == 1:
            if reference.shape[0] != u.shape[0]:
                raise ValueError(f"reference r has {reference.shape[0]} entries but there are {u.shape[0]} directions")
            reference = reference.to(device=h.device, dtype=torch.float32)
        elif tuple(reference.shape) == tuple(h.shape):
            with no_autocast(h.device):
                reference = rows_at(reference.to(h.device), index) @ u.T  # U x_ref of the selected rows, (N, k)
        else:
            raise ValueError(
                f"reference must be r of shape ({u.shape[0]},) or h_ref of shape {tuple(h.shape)}; "
                f"got {tuple(reference.shape)}"
            )
    return projection_from_index(h, u, index, reference, one_sided)


def projection_from_index(
    h: torch.Tensor,
    u: torch.Tensor,
    index: torch.Tensor | None,
    anchor: torch.Tensor | None = None,
    one_sided: bool = False,
) -> torch.Tensor:
    """``projection_penalty`` on the rows of ``h`` at flat ``index`` (``None``: all rows).

    ``u`` is float32 (k, d) on ``h``'s device; ``anchor`` is ``None``, r (k,), or the reference coordinates
    U x_ref of the same selected rows, (N, k) float32 — a constant.
    """
    if anchor is not None:
        anchor = anchor.detach()
    return _Projection.apply(h, index, u, anchor, one_sided)


def lora_weight_penalty(
    lora_a: torch.Tensor, lora_b: torch.Tensor, directions: torch.Tensor, scaling: float
) -> torch.Tensor:
    r"""Weight-space penalty of a LoRA update along harmful directions, without forming :math:`\Delta W`.

    For :math:`\Delta W = s\,B A` (B: (d, r) = ``lora_B.weight``, A: (r, in) = ``lora_A.weight``) writing into a
    residual stream whose harmful subspace is U (k, d):

    .. math:: \|U \Delta W\|_F^2 = s^2 \|(U B) A\|_F^2 = s^2\, \mathrm{tr}(M G M^\top),\quad M = U B,\ G = A A^\top

    costing O(k·d·r + r²·in) and never an (out × in) or (d × d) matrix. GPT-2's Conv1D (``fan_in_fan_out``) stores
    the same A and B; only ΔW's layout is transposed, so the formula is unchanged.
    """
    u = directions.to(device=lora_b.device, dtype=torch.float32)
    if u.shape[1] != lora_b.shape[0]:
        raise ValueError(
            f"directions have width {u.shape[1]} but this LoRA module writes {lora_b.shape[0]} features; "
            "only modules that write into the residual stream can carry the weight-space penalty"
        )
    with no_autocast(lora_b.device):  # it runs inside the model's forward, where autocast would pick bf16
        m = u @ lora_b.float()  # (k, r)
        a = lora_a.float()
        g = a @ a.T  # (r, r)
        return float(scaling) ** 2 * ((m @ g) * m).sum()
