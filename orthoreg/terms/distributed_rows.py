"""Data-parallel collectives of the penalties: a differentiable all-gather of rows, and a plain all-reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "data_parallel_world", "gather_rows"]


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
