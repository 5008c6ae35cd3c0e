"""Numerical health of the penalties, checked once per optimizer step instead of once per micro-batch.

Checking ``torch.isfinite(penalty)`` in Python after every micro-batch is a host-device sync on a GPU: the CPU waits
for the whole forward. Instead every micro-batch *records* its verdict as a device tensor, and the penalty that
enters the gradient is gated in the graph (``torch.where``), so no NaN/Inf penalty ever reaches the weights whatever
the policy. ``StepHealth.check()`` — one sync — runs before the optimizer step (``OrthoRegCallback`` in
``on_pre_optimizer_step``; ``OrthoLoRA`` in the forward that ends an accumulation cycle, before its backward) and
then raises or warns.

Two verdicts per micro-batch:

- **non-finite**: the weighted penalty is NaN/Inf (diverging training, fp16 overflow, a NaN in the batch). Policy
  ``"raise"``: the check raises ``NonFiniteHiddenStateError`` before the update; ``"skip"``: the micro-batch's
  penalty (value and gradient) is exactly 0 and the check warns with the count.
- **ill-conditioned**: the float32 covariance's Gram form could not be trusted (see
  ``orthoreg.terms.penalties.covariance_and_condition``); always refused, since its value and gradient may be far off.
"""

from __future__ import annotations

import logging

import torch

from ..terms.penalties import GRAM_CONDITION_LIMIT

logger = logging.getLogger(__name__)

__all__ = ["IllConditionedPenaltyError", "NonFiniteHiddenStateError", "StepHealth"]


class NonFiniteHiddenStateError(FloatingPointError):
    """A guarded layer produced NaN/Inf hidden states or penalties."""


class IllConditionedPenaltyError(FloatingPointError):
    """The float32 covariance penalty lost its precision (too many dominant feature columns with N < d)."""


class StepHealth:
    """Per-optimizer-step record of non-finite and ill-conditioned micro-batches, kept on the device.

    Args:
        on_nonfinite (`str`): ``"raise"`` or ``"skip"`` (``OrthoRegConfig.on_nonfinite``).
    """

    def __init__(self, on_nonfinite: str = "raise"):
        self.on_nonfinite = on_nonfinite
        self._nonfinite: torch.Tensor | None = None  # count of micro-batches with a non-finite penalty
        self._nonfinite_names: list[list[str]] = []  # per micro-batch: the candidate term names (read on failure)
        self._nonfinite_values: list[dict[str, torch.Tensor]] = []
        self._ill: dict[str, torch.Tensor] = {}  # term name → worst condition seen this step
        self.skipped_total = 0

    def gate(self, total: torch.Tensor, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Records whether ``total`` is finite and returns ``(gated total, keep)``: the total where finite, else
        exactly 0 (``keep`` is 1.0 or 0.0, to gate metrics too). No host sync."""
        keep = torch.isfinite(total.detach())
        bad = (~keep).to(torch.int32)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        self._nonfinite_values.append({k: v.detach() for k, v in values.items()})
        gated = torch.where(keep, total, torch.zeros_like(total))
        return gated, keep.to(total.dtype)

    def record_condition(self, name: str, condition: torch.Tensor) -> None:
        condition = condition.detach()
        previous = self._ill.get(name)
        self._ill[name] = condition if previous is None else torch.maximum(previous, condition)

    def reset(self) -> None:
        """Forgets what was recorded since the last check (a new training run starts)."""
        self._nonfinite, self._nonfinite_values, self._ill = None, [], {}

    @property
    def pending(self) -> bool:
        return self._nonfinite is not None or bool(self._ill)

    def check(self, step: int) -> int:
        """The step's one host sync: raises for ill-conditioned terms, and for non-finite penalties under
        ``"raise"``; under ``"skip"`` warns and returns how many micro-batches were dropped. Resets the record."""
        nonfinite, self._nonfinite = self._nonfinite, None
        values, self._nonfinite_values = self._nonfinite_values, []
        ill, self._ill = self._ill, {}
        if nonfinite is None and not ill:
            return 0
        names = list(ill)
        flags = torch.stack([nonfinite.float() if nonfinite is not None else torch.zeros(())]
                            + [ill[n].float().to(nonfinite.device if nonfinite is not None else ill[n].device)
                               for n in names]).tolist()  # one transfer
        dropped, conditions = int(flags[0]), dict(zip(names, flags[1:], strict=True))
        # NaN is the non-finite case below, not ill-conditioning (NaN > limit is False); +inf (no off-diagonal mass
        # left in float32) is ill-conditioned.
        worst = {n: c for n, c in conditions.items() if c > GRAM_CONDITION_LIMIT}
        if worst:
            raise IllConditionedPenaltyError(
                f"orthoreg's float32 covariance penalty lost its precision at step {step} "
                f"({', '.join(f'{n}: condition {c:.3g}' for n, c in worst.items())} > {GRAM_CONDITION_LIMIT:g}): with "
                "fewer selected tokens than the hidden size, more than orthoreg.terms.penalties.DOMINANT_COLUMNS feature "
                "columns dominate the rest, so its value and gradient cannot be trusted. Select more tokens "
                "(OrthoRegConfig(mask='attention'), larger batches) so N >= d, or raise "
                "orthoreg.terms.penalties.DOMINANT_COLUMNS."
            )
        if dropped == 0:
            return 0
        bad = sorted({name for batch in values for name, v in batch.items() if not bool(torch.isfinite(v))})
        message = (
            f"orthoreg penalty is not finite in {dropped} micro-batch(es) of step {step} ({', '.join(bad) or 'total'}):"
            " the guarded hidden states contain NaN/Inf (diverging training, fp16 overflow, a NaN in the batch)."
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteHiddenStateError(
                message + " The optimizer step was not taken. Lower the learning rate, use bf16 or fp32, or set "
                "OrthoRegConfig(on_nonfinite='skip') to drop such micro-batches' penalty."
            )
        logger.warning(message + " Their penalty was dropped (OrthoRegConfig(on_nonfinite='skip')).")
        self.skipped_total += dropped
        return dropped
