"""The loss terms of orthoreg as pure tensor functions (their exact formulas are in each docstring and the README).

Every function selects the rows of ``h`` where ``mask`` is true, casts them to float32 (whatever the training
dtype), and returns a 0-dim float32 tensor that is exactly 0 — with zero, finite gradients — when nothing is
selected. Nothing here knows about models, hooks or trainers.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

__all__ = [
    "covariance_penalty",
    "covariance_from_index",
    "covariance_and_condition",
    "no_autocast",
    "projection_from_index",
    "selected_index",
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

    Each rank's input gradient is the full derivative of the *global* loss times the world size W. DDP's gradient
    averaging then divides by W, and the update equals the single-process update on the concatenated batch
    (VICReg's ``FullGatherLayer``). In general backward all-reduces (sums) the gradient of the gathered tensor and
    returns this rank's slice. With ``identical_loss=True`` the caller guarantees that every rank computes the same
    loss from the gathered tensor (orthoreg's covariance of the global batch), so the gathered gradient is already
    the same on every rank and the all-reduce would only multiply it by W: backward then returns W × this rank's
    slice without communicating.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, identical_loss: bool) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.identical_loss = identical_loss
        out = x.new_empty((world,) + tuple(x.shape))
        dist.all_gather(list(out.unbind(0)), x.contiguous())  # straight into one buffer: no stacking copy
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rank = dist.get_rank()
        if ctx.identical_loss:
            return grad[rank] * dist.get_world_size(), None
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank], None


def data_parallel_world() -> int:
    """The number of ranks of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: torch.Tensor, identical_loss: bool = False) -> torch.Tensor:
    """Concatenates every data-parallel rank's (N_r, d) rows into (Σ N_r, d), differentiably.

    Ranks may hold different numbers of rows (different counts of real tokens): rows are padded to the largest
    count for the collective and the padding is dropped again. Without an initialised process group (or with one
    rank) this is the identity. See ``_AllGatherRows`` for how gradients are scaled; ``identical_loss=True`` (every
    rank computes the same loss from the result) makes backward communication-free.
    """
    world = data_parallel_world()
    if world == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros(max(counts), x.shape[1], device=x.device, dtype=x.dtype)
    padded = torch.cat([x, padded[x.shape[0]:]]) if x.shape[0] < max(counts) else x
    gathered = _AllGatherRows.apply(padded, identical_loss)  # (W, max N, d)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks of the default process group (``x`` itself with one rank); not differentiable.
    The collective runs where the backend needs it (NCCL: the current CUDA device, gloo: the CPU) and the result
    comes back on ``x``'s device."""
    if data_parallel_world() == 1:
        return x
    if dist.get_backend() == "nccl":
        device = x.device if x.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    buffer = x.detach().to(device).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(x.device)


def selected_index(mask: torch.Tensor | None, num_rows: int | None = None) -> torch.Tensor | None:
    """Flat row indices of the tokens selected by ``mask`` (B, T), or ``None`` when every token is selected.

    Computing the indices once per forward and sharing them across layers and penalties replaces a boolean-mask
    gather per layer and per term (each one a device sync and a copy of the rows); ``None`` lets the penalties read
    the rows of ``h`` without any copy.
    """
    if mask is None:
        return None
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat.bool()
    index = flat.nonzero().squeeze(1)
    if index.numel() == (flat.numel() if num_rows is None else num_rows):
        return None
    return index


def _rows(h: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, d) float32 (or ``dtype``) rows of ``h`` at ``index`` (all rows when ``None``: a view when ``h`` is
    already of that dtype)."""
    flat = h.reshape(-1, h.shape[-1])
    if index is not None:
        flat = flat.index_select(0, index)
    return flat.to(dtype)


def _centre(rows: torch.Tensor, mu: torch.Tensor, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``rows - mu`` for ``rows = _rows(h, index)``: in place when those rows are a fresh copy (a token gather or a
    dtype cast; one pass, no allocation), out of place when they are a view of ``h``, which must stay untouched."""
    is_copy = index is not None or h.dtype != rows.dtype
    return rows.sub_(mu) if is_copy else rows - mu


def _rows_grad(grad_rows: torch.Tensor, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Scatters the gradient of the selected rows back to the shape (and dtype) of ``h``; unselected rows get 0."""
    if index is None:
        return grad_rows.to(h.dtype).view(h.shape)
    out = torch.zeros(h.numel() // h.shape[-1], h.shape[-1], dtype=h.dtype, device=h.device)
    return out.index_copy_(0, index, grad_rows.to(h.dtype)).view(h.shape)


def no_autocast(device: torch.device):
    """Float32 math inside an autocast region (mixed-precision training computes the penalties inside the model's
    forward): without this, autocast would run the products in bf16/fp16. Shared by every module that multiplies
    hidden states or weights for a penalty or a reference statistic."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _symmetric_product(a: torch.Tensor) -> torch.Tensor:
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
# adds 3·m/N of one product (m = ``DOMINANT_COLUMNS``), not counted. Read by ``scripts/bench_overhead.py`` for its
# analytic FLOP count.
COV_FORWARD_MATMULS = 0.625
COV_BACKWARD_MATMULS = 1


def _scaled(factor: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``factor · coef``, and exactly 0 when ``coef`` is 0 even where ``factor`` is Inf/NaN: a penalty gated off
    (``orthoreg.health``: a non-finite micro-batch under ``on_nonfinite="skip"``) must send no gradient at all.
    Applied to the small factor (d×d, N×N, N×k), never to the (N, d) result, so it costs nothing measurable."""
    return torch.where(coef != 0, factor * coef, torch.zeros((), dtype=factor.dtype, device=factor.device))


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
        x = _rows(h, index, ctx.dtype)
        n, d = x.shape
        ctx.n, ctx.d = n, d
        ctx.h_meta = (h.shape, h.dtype, h.device)
        ctx.empty = n < 2  # no off-diagonal covariance (and no rows to read when n == 0): exactly 0, zero gradient
        ctx.gram = n < d
        if ctx.empty:
            return x.new_zeros(()), x.new_zeros(())
        mu = x.mean(dim=0, keepdim=True)
        xc = _centre(x, mu, h, index)
        del x
        scale = 1.0 / (float(n - 1) ** 2 * d)
        if not ctx.gram:
            # Zero the diagonal explicitly: subtracting Σ S_ii² from ‖S‖² would cancel catastrophically in float32
            # exactly when the features are nearly decorrelated (diagonal ≫ off-diagonal), the regime we push toward.
            s = _symmetric_product(xc)  # (d, d) = Xcᵀ Xc
            s.diagonal().zero_()
            off_sq = torch.linalg.vector_norm(s).square()
            ctx.save_for_backward(h, index, mu, s)
            return off_sq * scale, off_sq.new_zeros(())
        col_sq = xc.square().sum(dim=0)  # (d,) the diagonal of Xcᵀ Xc
        big = torch.topk(col_sq, min(DOMINANT_COLUMNS, d)).indices  # (m,) no host sync: a fixed count
        xb = xc.index_select(1, big)  # (N, m)
        xs = xc.index_fill_(1, big, 0.0)  # xc is this function's own copy (see _centre / _rows)
        cs = col_sq.index_fill(0, big, 0.0)
        g = _symmetric_product(xs.T)  # (N, N) = X_s X_sᵀ
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
        xc = _centre(_rows(h, index, ctx.dtype), mu, h, index)
        coef = grad * (4.0 / (float(n - 1) ** 2 * d))
        # The coefficient scales the small factors, not the (N, d) result.
        if not ctx.gram:
            (s,) = stats
            return _rows_grad(xc @ _scaled(s, coef), h, index), None, None
        g, cs, big, p, sbb = stats
        xb = xc.index_select(1, big)
        xs = xc.index_fill_(1, big, 0.0)
        g, cs, p, sbb = (_scaled(t, coef) for t in (g, cs, p, sbb))
        gx = torch.addcmul(g @ xs, xs, cs, value=-1.0)  # dominant columns are 0 here
        gx.addmm_(xb, p.T)  # + X_b Pᵀ: pairs (s, b) seen from s
        gx.index_copy_(1, big, xs @ p + xb @ sbb)  # the dominant columns' own gradient
        return _rows_grad(gx, h, index), None, None


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
        x = _rows(h, index)
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
        gx = _scaled(e, grad * (2.0 / ctx.n)) @ u  # d/de of max(e, 0)² is 2 max(e, 0): the same formula
        return _rows_grad(gx, h, index), None, None, None, None


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
                reference = _rows(reference.to(h.device), index) @ u.T  # U x_ref of the selected rows, (N, k)
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
