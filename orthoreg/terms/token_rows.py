"""Selecting the tokens that count and reading their rows in float32: the shared groundwork of every penalty.

``selected_index`` turns a (B, T) mask into flat row indices once per forward; ``rows_at`` reads those rows of ``h``
in float32 (a view when nothing needs copying), ``centre_rows`` subtracts their mean without touching ``h``, and
``rows_gradient`` scatters a gradient of the rows back to ``h``'s shape and dtype. ``no_autocast`` keeps the math in
float32 inside mixed-precision forwards; ``scaled_factor`` keeps a gated-off penalty from sending NaN gradients.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["centre_rows", "no_autocast", "rows_at", "rows_gradient", "scaled_factor", "select_tokens",
           "selected_index"]


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


def rows_at(h: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, d) float32 (or ``dtype``) rows of ``h`` at ``index`` (all rows when ``None``: a view when ``h`` is
    already of that dtype)."""
    flat = h.reshape(-1, h.shape[-1])
    if index is not None:
        flat = flat.index_select(0, index)
    return flat.to(dtype)


def centre_rows(rows: torch.Tensor, mu: torch.Tensor, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``rows - mu`` for ``rows = rows_at(h, index)``: in place when those rows are a fresh copy (a token gather or a
    dtype cast; one pass, no allocation), out of place when they are a view of ``h``, which must stay untouched."""
    is_copy = index is not None or h.dtype != rows.dtype
    return rows.sub_(mu) if is_copy else rows - mu


def rows_gradient(grad_rows: torch.Tensor, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
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




def scaled_factor(factor: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``factor · coef``, and exactly 0 when ``coef`` is 0 even where ``factor`` is Inf/NaN: a penalty gated off
    (``orthoreg.engine.health``: a non-finite micro-batch under ``on_nonfinite="skip"``) must send no gradient at all.
    Applied to a penalty's small factor (d×d, N×N, N×k), never to the (N, d) result, so it costs nothing measurable."""
    return torch.where(coef != 0, factor * coef, torch.zeros((), dtype=factor.dtype, device=factor.device))
