r"""Gradient injection: add :math:`c\,\partial p/\partial\theta` to the parameters' gradients without adding ``p`` to
the loss.

A penalty ``p`` computed inside a module's forward (where ZeRO-3/FSDP have the module's parameters gathered) is
attached to that module's *output* ``x`` by ``inject_penalty(x, p, scale)``: the forward is the identity on ``x``,
and the backward passes ``∂L/∂x`` through unchanged and also sends ``scale.multiplier()`` into ``p``, so the
parameters receive exactly the gradient of ``L + multiplier · p`` — and ``p``'s own backward runs inside the module's
backward, where the parameters are gathered again.

Where the multiplier comes from (``PenaltyScale``):

- ``PenaltyScale(coef)``: a number known at forward time, e.g. λ·w(t)/GA for a ``TrainerCallback`` (the Trainer never
  sees the penalty; its gradient simply arrives with the task's);
- ``PenaltyScale(coef, tapped=True)``: :math:`c \cdot \partial L/\partial v`, read in backward from ``scale.tap(v)``,
  an identity on the (detached) weighted value that the caller adds to its loss. Whatever then scales the loss —
  ``accelerator.backward``'s 1/GA, an fp16 loss scale, DeepSpeed's own scaling — scales the injected gradient
  identically. ``tap`` is created after the model's forward, so autograd runs its backward before any injection
  node that reads the recorded value (ready nodes run in decreasing creation order).
"""

from __future__ import annotations

import torch

__all__ = ["InjectPenaltyGradient", "LossGradientTap", "PenaltyScale", "inject_penalty"]


class PenaltyScale:
    """The multiplier an injected penalty's gradient receives, read when the injection's backward runs.

    Args:
        coef (`float`): c. Without ``tapped`` the multiplier is c.
        tapped (`bool`, *optional*, defaults to `False`): the multiplier is c · ∂L/∂v, with v the output of
            ``tap``; until ``tap``'s backward has run (the loss carrying v was not backpropagated) it is 0.

    Attributes:
        loss_grad (`torch.Tensor | None`): ∂L/∂(tap output), recorded by ``tap``'s backward.
        finished (`bool`): the backward pass that ran ``tap``'s backward has ended (tapped scales only); calls made
            afterwards are not activation-checkpoint recomputes of this forward.
        gate (`torch.Tensor | float`): a further factor, 1 or 0 — 0 when the penalty was found non-finite in the
            forward (``orthoreg.engine.health``), so none of its gradient is sent; a device tensor, read without a sync.
    """

    def __init__(self, coef: float, tapped: bool = False):
        self.coef = float(coef)
        self.tapped = tapped
        self.loss_grad: torch.Tensor | None = None
        self.finished = False
        self.gate: torch.Tensor | float = 1.0

    def multiplier(self) -> torch.Tensor | float:
        if not self.tapped:
            return self.coef * self.gate
        if self.loss_grad is None:
            return 0.0
        return self.loss_grad * self.coef * self.gate

    def tap(self, value: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:
        """An identity on ``value`` (detached: its gradient reaches the parameters only through the injection
        nodes) whose backward records ∂L/∂value.

        ``anchors`` (tensors of the model's forward, downstream of every injection node, e.g. the logits) receive a
        zero gradient, so backward reaches the injection nodes even when only the tapped value is backpropagated.
        """
        if not self.tapped:
            raise RuntimeError("PenaltyScale.tap needs PenaltyScale(coef, tapped=True)")
        leaf = value.detach().requires_grad_(True)  # a fresh leaf, so the tap's backward always runs
        return LossGradientTap.apply(leaf, self, *anchors)


class LossGradientTap(torch.autograd.Function):
    """Identity on ``value``; backward stores ∂L/∂value in ``scale.loss_grad`` (see ``PenaltyScale.tap``)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, scale: PenaltyScale, *anchors: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        ctx.anchor_meta = [(a.shape, a.dtype, a.device) for a in anchors]
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale = ctx.scale
        scale.loss_grad = grad.detach()
        scale.finished = False

        def _finish() -> None:
            scale.finished = True

        # Runs when this (outer) backward ends; reentrant-checkpoint recomputes happen before that.
        torch.autograd.Variable._execution_engine.queue_callback(_finish)
        # A broadcast scalar, not an activation-sized buffer: the edge only has to exist.
        zeros = tuple(torch.zeros((), dtype=dtype, device=device).expand(shape)
                      for shape, dtype, device in ctx.anchor_meta)
        return (None, None, *zeros)


class InjectPenaltyGradient(torch.autograd.Function):
    """Identity on ``x``; backward returns ∂L/∂x unchanged and ``scale.multiplier()`` as the gradient of ``penalty``
    (a scalar)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, penalty: torch.Tensor, scale: PenaltyScale) -> torch.Tensor:
        ctx.scale = scale
        ctx.penalty_meta = (penalty.dtype, penalty.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        dtype, device = ctx.penalty_meta
        multiplier = ctx.scale.multiplier()
        if isinstance(multiplier, torch.Tensor):
            grad_p = multiplier.to(device=device, dtype=dtype).reshape(())
        else:
            grad_p = torch.full((), multiplier, dtype=dtype, device=device)
        return grad_x, grad_p, None


def inject_penalty(x: torch.Tensor, penalty: torch.Tensor, scale: PenaltyScale) -> torch.Tensor:
    """``x`` unchanged, carrying ``penalty``'s gradient (times ``scale.multiplier()``) into backward.

    Args:
        x (`torch.Tensor`): a differentiable output of the module whose forward computed ``penalty``.
        penalty (`torch.Tensor`): a scalar that depends on the parameters.
        scale (`PenaltyScale`): where the multiplier comes from.
    """
    return InjectPenaltyGradient.apply(x, penalty, scale)
