"""The loss terms of orthoreg as pure tensor functions (the math contract of ``shared/design.md``).

Every function selects the rows of ``h`` where ``mask`` is true, casts them to float32 (whatever the training
dtype), and returns a 0-dim float32 tensor that is exactly 0 — with zero, finite gradients — when nothing is
selected. Nothing here knows about models, hooks or trainers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "covariance_penalty",
    "projection_penalty",
    "lora_weight_penalty",
    "select_tokens",
    "gather_rows",
]


def select_tokens(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, d) float32 matrix X of the selected rows of ``h`` ((B, T, d) or (N, d))."""
    if h.dim() < 2:
        raise ValueError(f"hidden states must be (B, T, d) or (N, d); got shape {tuple(h.shape)}")
    d = h.shape[-1]
    if mask is None:
        return h.reshape(-1, d).float()
    if tuple(mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden states are {tuple(h.shape)}")
    return h[mask.to(device=h.device, dtype=torch.bool)].float()


class _AllGatherRows(torch.autograd.Function):
    """All-gather of equal-shaped per-rank tensors that keeps gradients.

    Backward all-reduces (sums) the gradient of the gathered tensor and returns this rank's slice, so each rank's
    input gradient is the full derivative of the *global* loss times the world size W (every rank computes the same
    global loss). DDP's gradient averaging then divides by W, and the update equals the single-process update on
    the concatenated batch (VICReg's ``FullGatherLayer``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every data-parallel rank's (N_r, d) rows into (Σ N_r, d), differentiably.

    Ranks may hold different numbers of rows (different counts of real tokens): rows are padded to the largest
    count for the collective and the padding is dropped again. Without an initialised process group (or with one
    rank) this is the identity. See ``_AllGatherRows`` for how gradients are scaled.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros(max(counts), x.shape[1], device=x.device, dtype=x.dtype)
    padded = torch.cat([x, padded[x.shape[0]:]]) if x.shape[0] < max(counts) else x
    gathered = _AllGatherRows.apply(padded)  # (W, max N, d)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def covariance_penalty(h: torch.Tensor, mask: torch.Tensor | None = None, gather: bool = False) -> torch.Tensor:
    r"""Off-diagonal covariance penalty (the VICReg covariance term) of the selected hidden states.

    With X the (N, d) float32 matrix of selected rows, :math:`\mu` its row mean, :math:`X_c = X - \mu` and
    :math:`C = X_c^\top X_c / \max(N - 1, 1)`:

    .. math:: \mathrm{cov}(h) = \frac{1}{d} \sum_{i \ne j} C_{ij}^2 = \frac{\|C\|_F^2 - \sum_i C_{ii}^2}{d}

    When N < d the d×d matrix C is never formed: :math:`\|X_c^\top X_c\|_F = \|X_c X_c^\top\|_F` (the N×N Gram
    matrix), and :math:`C_{ii}` are column sums of squares.

    Args:
        h (`torch.Tensor`): hidden states (B, T, d) or (N, d), any float dtype.
        mask (`torch.Tensor`, *optional*): boolean (B, T) selection of the tokens that count.
        gather (`bool`, *optional*, defaults to `False`): use the rows of every data-parallel rank (see
            ``gather_rows``), so the statistic is that of the global batch.

    Returns:
        A 0-dim float32 tensor; exactly 0 when fewer than two rows are selected.
    """
    x = select_tokens(h, mask)
    if gather:
        x = gather_rows(x)
    n, d = x.shape
    if n == 0:
        return x.sum()  # exact 0, gradient of zeros
    xc = x - x.mean(dim=0, keepdim=True)
    denom = max(n - 1, 1)
    if n >= d:
        # Zero the diagonal explicitly: subtracting Σ C_ii² from ‖C‖² would cancel catastrophically in float32
        # exactly when the features are nearly decorrelated (diagonal ≫ off-diagonal), the regime we push toward.
        scatter = xc.T @ xc  # (d, d)
        off_sq = (scatter - torch.diag_embed(torch.diagonal(scatter))).square().sum()
    else:
        # Gram form. Here the subtraction is benign: for N < d the off-diagonal mass is ~d/N times the diagonal's.
        total_sq = (xc @ xc.T).square().sum()  # ‖Xc Xcᵀ‖_F² = ‖Xcᵀ Xc‖_F²
        off_sq = total_sq - xc.square().sum(dim=0).square().sum()
    return off_sq / (denom * denom * d)


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
    u = directions.to(device=h.device, dtype=torch.float32)
    x = select_tokens(h, mask)
    if x.shape[0] == 0:
        return x.sum()
    coords = x @ u.T  # (N, k)
    if reference is not None:
        reference = reference.detach()
        if reference.dim() == 1:
            if reference.shape[0] != u.shape[0]:
                raise ValueError(f"reference r has {reference.shape[0]} entries but there are {u.shape[0]} directions")
            coords = coords - reference.to(device=h.device, dtype=torch.float32)
        elif tuple(reference.shape) == tuple(h.shape):
            coords = coords - select_tokens(reference, mask) @ u.T
        else:
            raise ValueError(
                f"reference must be r of shape ({u.shape[0]},) or h_ref of shape {tuple(h.shape)}; "
                f"got {tuple(reference.shape)}"
            )
    if one_sided:
        coords = coords.clamp(min=0)
    return coords.square().sum() / x.shape[0]


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
    m = u @ lora_b.float()  # (k, r)
    a = lora_a.float()
    g = a @ a.T  # (r, r)
    return float(scaling) ** 2 * ((m @ g) * m).sum()
