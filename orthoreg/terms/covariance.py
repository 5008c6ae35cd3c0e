"""The covariance penalty (the VICReg covariance term) of selected hidden states, exact in float32 with massive
activations, with a closed-form backward."""

from __future__ import annotations

import math

import torch

from .distributed_rows import data_parallel_world, gather_rows
from .token_rows import centre_rows, no_autocast, rows_at, rows_gradient, scaled_factor, selected_index

__all__ = ["COV_BACKWARD_MATMULS", "COV_FORWARD_MATMULS", "DOMINANT_COLUMNS", "GRAM_CONDITION_LIMIT",
           "covariance_and_condition", "covariance_from_index", "covariance_penalty", "symmetric_product"]


def symmetric_product(a: torch.Tensor) -> torch.Tensor:
    """aᵀa for a (m, n) matrix, computing only the blocks on and above the diagonal and mirroring the rest.

    BLAS has no symmetric rank-k product in torch, so a plain ``a.T @ a`` does all n² dot products; with b×b
    blocks only b(b+1)/2 are computed ((b+1)/(2b) of the work; b = 4 for n ≥ 512, 2 for n ≥ 256, else one
    product). Every entry is still a single dot product over m, as in ``a.T @ a``.
    """
    n = a.shape[1]
    blocks = 4 if n >= 512 else 2 if n >= 256 else 1
    if blocks == 1:
        return a.T @ a
    edges = [n * i // blocks for i in range(blocks + 1)]
    cols = [a[:, edges[i]:edges[i + 1]] for i in range(blocks)]
    out = a.new_empty(n, n)
    for i in range(blocks):
        rows_i = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            part = cols[i].T @ cols[j]
            out[rows_i, edges[j]:edges[j + 1]] = part
            if j != i:
                out[edges[j]:edges[j + 1], rows_i] = part.T
    return out


# How many of the largest feature columns the Gram path (N < d) splits out and treats exactly (see
# ``_OffDiagonalCovariance``). Real LLMs carry a handful of massive-activation dimensions (hundreds to thousands of
# times the others' scale); their own squared norms would otherwise swamp the float32 difference ‖G‖² − Σ c_j².
DOMINANT_COLUMNS = 8
# Beyond this value of √N·‖c_s‖²/off_s (the diagonal mass left in the Gram path against the off-diagonal result) the
# float32 difference can lose more than ~3e-5 of its value; the penalty then reports itself ill-conditioned
# (``covariance_and_condition``) instead of returning a number that may be far off.
GRAM_CONDITION_LIMIT = 200.0

# Cost of the covariance penalty in units of one (N, d)·(d, min(N, d)) product, forward and backward (the forward's
# symmetric product does (b+1)/(2b) of one with b = 4 blocks at the sizes that matter; the backward is one full
# product where autograd's generic backward of ``Xcᵀ Xc`` would take two). The Gram path's dominant-column split
# adds 3·m/N of one product (m = ``DOMINANT_COLUMNS``), not counted. Read by ``scripts/overhead/flops.py`` for its
# analytic FLOP count.
COV_FORWARD_MATMULS = 0.625
COV_BACKWARD_MATMULS = 1


class _OffDiagonalCovariance(torch.autograd.Function):
    r"""Σ_{i≠j} C_ij² / d of the rows of ``h`` at ``index``, with a closed-form backward.

    Returns ``(value, condition)``; ``condition`` (not differentiable) is 0 on the N ≥ d path and the Gram path's
    ‖c_s‖² / off_s otherwise — above ``GRAM_CONDITION_LIMIT`` the value is not trustworthy in float32.

    Forward, N ≥ d: S = X_cᵀX_c with its diagonal zeroed, off = ‖S‖_F². N < d (Gram form): the m =
    ``DOMINANT_COLUMNS`` columns with the largest c_j = Σ_i X_c,ij² form X_b (N × m), the rest X_s (their columns
    zeroed in place), and

        off = (‖X_s X_sᵀ‖_F² − Σ_{j∈s} c_j²) + 2 ‖X_sᵀ X_b‖_F² + Σ_{j≠l ∈ b} (X_bᵀ X_b)_jl²

    — an exact regrouping of Σ_{j≠l} S_jl² (the first term: pairs inside s; the second: pairs across; the third:
    pairs inside b) in which no massive column's c_j² is ever subtracted, so one dimension ×10⁴ larger than the rest
    costs no precision (the plain ‖G‖² − Σ c_j² loses it all). Each term is O(N·d·min(N, d)) at most.

    Backward: ∂off/∂X_c = 4 X_c S_off (S_off = S with a zero diagonal): N ≥ d one product; N < d, per block,
    4 (G_s X_s − X_s diag(c_s) + X_b Pᵀ) on s and 4 (X_s P + X_b S_bb,off) on b (P = X_sᵀX_b). The centring's
    Jacobian is exactly zero (1ᵀX_c = 0). Saved: ``h`` itself (kept alive by the model anyway), the indices, μ and
    the small factors (S d×d, or G_s N×N, c_s, P d×m, S_bb m×m) — never the (N, d) float32 copy of the rows,
    which backward re-reads from ``h``.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        ctx.dtype = dtype
        with no_autocast(h.device):
            value, condition = _OffDiagonalCovariance._forward(ctx, h, index)
        ctx.mark_non_differentiable(condition)
        return value, condition

    @staticmethod
    def _forward(ctx, h: torch.Tensor, index: torch.Tensor | None):
        x = rows_at(h, index, ctx.dtype)
        n, d = x.shape
        ctx.n, ctx.d = n, d
        ctx.h_meta = (h.shape, h.dtype, h.device)
        ctx.empty = n < 2  # no off-diagonal covariance (and no rows to read when n == 0): exactly 0, zero gradient
        ctx.gram = n < d
        if ctx.empty:
            return x.new_zeros(()), x.new_zeros(())
        mu = x.mean(dim=0, keepdim=True)
        xc = centre_rows(x, mu, h, index)
        del x
        scale = 1.0 / (float(n - 1) ** 2 * d)
        if not ctx.gram:
            # Zero the diagonal explicitly: subtracting Σ S_ii² from ‖S‖² would cancel catastrophically in float32
            # exactly when the features are nearly decorrelated (diagonal ≫ off-diagonal), the regime we push toward.
            s = symmetric_product(xc)  # (d, d) = Xcᵀ Xc
            s.diagonal().zero_()
            off_sq = torch.linalg.vector_norm(s).square()
            ctx.save_for_backward(h, index, mu, s)
            return off_sq * scale, off_sq.new_zeros(())
        col_sq = xc.square().sum(dim=0)  # (d,) the diagonal of Xcᵀ Xc
        big = torch.topk(col_sq, min(DOMINANT_COLUMNS, d)).indices  # (m,) no host sync: a fixed count
        xb = xc.index_select(1, big)  # (N, m)
        xs = xc.index_fill_(1, big, 0.0)  # xc is this function's own copy (see _centre / _rows)
        cs = col_sq.index_fill(0, big, 0.0)
        g = symmetric_product(xs.T)  # (N, N) = X_s X_sᵀ
        inside_s = torch.linalg.vector_norm(g).square() - cs.square().sum()
        p = xs.T @ xb  # (d, m), rows of the dominant columns are 0
        sbb = xb.T @ xb  # (m, m)
        sbb.diagonal().zero_()
        off_sq = inside_s + 2.0 * torch.linalg.vector_norm(p).square() + torch.linalg.vector_norm(sbb).square()
        # Diagonal mass left against the result, times √N (measured: the float32 error grows with both; below 200
        # it stays under ~3e-5 relative on adversarial data, and benign N < d data sits near N/d·√N).
        condition = cs.square().sum() / inside_s.clamp_min(torch.finfo(xc.dtype).tiny) * math.sqrt(n)
        if ctx.dtype == torch.float64:
            condition = condition.new_zeros(())  # float64 has ~9 more digits than any realistic condition needs
        ctx.save_for_backward(h, index, mu, g, cs, big, p, sbb)
        return off_sq * scale, condition

    @staticmethod
    def backward(ctx, grad, _grad_condition):
        with no_autocast(grad.device):
            return _OffDiagonalCovariance._backward(ctx, grad.to(ctx.dtype))

    @staticmethod
    def _backward(ctx, grad):
        if ctx.empty:
            shape, dtype, device = ctx.h_meta
            return torch.zeros(shape, dtype=dtype, device=device), None, None
        h, index, mu, *stats = ctx.saved_tensors
        n, d = ctx.n, ctx.d
        xc = centre_rows(rows_at(h, index, ctx.dtype), mu, h, index)
        coef = grad * (4.0 / (float(n - 1) ** 2 * d))
        # The coefficient scales the small factors, not the (N, d) result.
        if not ctx.gram:
            (s,) = stats
            return rows_gradient(xc @ scaled_factor(s, coef), h, index), None, None
        g, cs, big, p, sbb = stats
        xb = xc.index_select(1, big)
        xs = xc.index_fill_(1, big, 0.0)
        g, cs, p, sbb = (scaled_factor(t, coef) for t in (g, cs, p, sbb))
        gx = torch.addcmul(g @ xs, xs, cs, value=-1.0)  # dominant columns are 0 here
        gx.addmm_(xb, p.T)  # + X_b Pᵀ: pairs (s, b) seen from s
        gx.index_copy_(1, big, xs @ p + xb @ sbb)  # the dominant columns' own gradient
        return rows_gradient(gx, h, index), None, None


def covariance_penalty(h: torch.Tensor, mask: torch.Tensor | None = None, gather: bool = False) -> torch.Tensor:
    r"""Off-diagonal covariance penalty (the VICReg covariance term) of the selected hidden states.

    With X the (N, d) float32 matrix of selected rows, :math:`\mu` its row mean, :math:`X_c = X - \mu` and
    :math:`C = X_c^\top X_c / \max(N - 1, 1)`:

    .. math:: \mathrm{cov}(h) = \frac{1}{d} \sum_{i \ne j} C_{ij}^2 = \frac{\|C\|_F^2 - \sum_i C_{ii}^2}{d}

    When N < d the d×d matrix C is never formed: :math:`\|X_c^\top X_c\|_F = \|X_c X_c^\top\|_F` (the N×N Gram
    matrix), and :math:`C_{ii}` are column sums of squares. The cheaper form is taken: N·d·min(N, d) multiply-adds
    forward and as many backward (a closed-form gradient: one product instead of autograd's two).

    Args:
        h (`torch.Tensor`): hidden states (B, T, d) or (N, d), any float dtype.
        mask (`torch.Tensor`, *optional*): boolean (B, T) selection of the tokens that count.
        gather (`bool`, *optional*, defaults to `False`): use the rows of every data-parallel rank (see
            ``gather_rows``), so the statistic is that of the global batch.

    Returns:
        A 0-dim float32 tensor; exactly 0 when fewer than two rows are selected.
    """
    if h.dim() < 2:
        raise ValueError(f"hidden states must be (B, T, d) or (N, d); got shape {tuple(h.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden states are {tuple(h.shape)}")
    index = selected_index(None if mask is None else mask.to(h.device))
    return covariance_from_index(h, index, gather=gather)


def covariance_from_index(h: torch.Tensor, index: torch.Tensor | None, gather: bool = False) -> torch.Tensor:
    """``covariance_penalty`` on the rows of ``h`` at flat ``index`` (``None``: all rows; see ``selected_index``).

    Exact in every case: when the float32 Gram form is ill-conditioned (more than ``DOMINANT_COLUMNS`` massive
    feature columns with N < d; see ``covariance_and_condition``) it is recomputed in float64, which costs one host
    sync per call. Training loops that must not sync use ``covariance_and_condition`` and check the condition once
    per optimizer step, as ``OrthoRegularizer`` does.
    """
    value, condition = covariance_and_condition(h, index, gather=gather)
    if bool(condition > GRAM_CONDITION_LIMIT):
        value, _ = covariance_and_condition(h, index, gather=gather, dtype=torch.float64)
        value = value.float()
    return value


def covariance_and_condition(
    h: torch.Tensor, index: torch.Tensor | None, gather: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The covariance penalty of the rows of ``h`` at ``index`` and its float32 condition number, without a host
    sync: ``condition > GRAM_CONDITION_LIMIT`` means the value may be off by more than ~1e-5 relative (only possible
    on the Gram path, N < d, when more than ``DOMINANT_COLUMNS`` columns dominate). ``dtype=torch.float64``
    computes exactly whatever the data, at float64 cost."""
    if gather and data_parallel_world() > 1:
        # Rows travel in the model's dtype (half the bytes of float32 for bf16 models; the cast is exact either
        # way), and every rank computes the same covariance from them, so backward needs no communication.
        rows = h.reshape(-1, h.shape[-1])
        if index is not None:
            rows = rows.index_select(0, index)
        return _OffDiagonalCovariance.apply(gather_rows(rows, identical_loss=True).to(dtype), None, dtype)
    return _OffDiagonalCovariance.apply(h, index, dtype)
