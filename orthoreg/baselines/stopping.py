"""Early stopping once a logged or evaluated metric crosses a threshold."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState

logger = logging.getLogger(__name__)

__all__ = ["EarlyStoppingOnMetric"]


class EarlyStoppingOnMetric(TrainerCallback):
    """Stops training once a logged or evaluated metric crosses a threshold (e.g. the task is learned).

    Checked on every ``on_log`` (training logs such as ``loss``) and ``on_evaluate`` (``eval_*`` metrics). When the
    metric is at or beyond ``threshold`` on ``patience`` consecutive checks, training stops after the current step
    (and, with ``save=True``, that step is checkpointed). Unlike ``transformers.EarlyStoppingCallback`` (which stops
    when an eval metric stops improving) this stops as soon as a target is reached: the early-stopping defence
    against emergent misalignment stops once the narrow task is learned, before training runs on.

    Args:
        metric (`str`): a key of the logs or eval metrics (``"loss"``, ``"eval_loss"``, ``"eval_accuracy"``, …);
            ``"x"`` also matches ``"eval_x"``.
        threshold (`float`): the target value.
        mode (`str`, *optional*, defaults to `"min"`): ``"min"`` stops when metric <= threshold, ``"max"`` when
            metric >= threshold.
        patience (`int`, *optional*, defaults to `1`): consecutive checks that must meet the target.
        save (`bool`, *optional*, defaults to `True`): checkpoint the step at which training stops.

    Attributes:
        stopped_step (`int | None`): the global step at which the target was met, or None.

    Example:
        >>> trainer = Trainer(..., callbacks=[EarlyStoppingOnMetric("eval_task_accuracy", 0.98, mode="max")])
    """

    def __init__(self, metric: str, threshold: float, mode: Literal["min", "max"] = "min", patience: int = 1,
                 save: bool = True):
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'; got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an int >= 1; got {patience!r}")
        self.metric, self.threshold, self.mode, self.patience, self.save = metric, float(threshold), mode, patience, save
        self.stopped_step: int | None = None
        self._hits = 0
        self._seen = False

    def _check(self, values: Mapping[str, Any] | None, state: TrainerState, control: TrainerControl) -> None:
        if not values:
            return
        key = self.metric if self.metric in values else f"eval_{self.metric}"
        value = values.get(key)
        if not isinstance(value, (int, float)):
            return
        self._seen = True
        met = value <= self.threshold if self.mode == "min" else value >= self.threshold
        self._hits = self._hits + 1 if met else 0
        if self._hits >= self.patience and self.stopped_step is None:
            self.stopped_step = state.global_step
            control.should_training_stop = True
            if self.save:
                control.should_save = True
            logger.info("EarlyStoppingOnMetric: %s = %.4g reached %.4g at step %d; stopping", key, value,
                        self.threshold, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._check(logs, state, control)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._check(metrics, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._seen:
            logger.warning(
                "EarlyStoppingOnMetric never saw %r in the logs or eval metrics; check the name (and that "
                "logging_steps/eval_strategy produce it)", self.metric,
            )

