r"""The harm-margin guard: act on the live refusal margin (``harm_signal``) — warn, stop, or raise a penalty's λ.

The drift firewall (``callback``) watches the guarded layers' activations along the harmful directions; on a real
model those barely move while refusals collapse (README, "A live harm signal"). What does move is the refusal
margin at the first reply token of harmful requests. This guard reads it every ``every_n_steps`` optimizer steps
(``HarmSignalCallback``, whose probe and logs it inherits) and acts on the **fall**

.. math::

    f_t = -\,(\mathrm{harm\_margin}_t - \mathrm{harm\_margin}_0) \quad\text{(nats; > 0 when refusals lose ground)}

against a bound B (``max_fall``):

- ``"warn"``: one warning per crossing of f_t > B (again only after f has come back under B);
- ``"stop"``: warn, then stop after ``patience`` consecutive readings over B (``control.should_training_stop`` and
  ``should_save``, so the last checkpoint is the stopping step);
- ``"adapt"``: budget mode. After each reading the λ of one term of the linked ``OrthoRegCallback`` (``term``: the
  template-reader term by default, what ``OrthoRegConfig.recommended()`` runs) is set by the same velocity-form PI law
  on the log error as the drift budget (``budget.DriftBudgetController``, with f_t in place of the drift:
  e_t = clip(log(max(f_t, 0) / (target·B)), ±e_max)), started at the configured λ₀ and floored there
  (``floor="hold"``): the guard only ever *raises* the user's λ, up to ``max_factor``·λ₀, and brings it back toward
  λ₀ once the margin has recovered. A margin that rises (f ≤ 0) is a full-size negative error.

**Measured** (README, "A live harm signal…"; SmolLM2-135M, 3 eroding tasks × 3 seeds): budget mode on the reader
term with B = 2 nats leaves +9.4 / +5.6 / +0.0 points of harmful attempts where plain LoRA rises +31 / +22 / +16 and
the reader term alone +11.5 / +6.6 / −0.7 — the margin falls within the first 10 steps and, on the worst task, stays
down at any reader λ. Use warn / stop as a monitor; do not expect budget mode to hold erosion the raised term cannot
reach.

The readings come every ``every_n_steps`` steps, not every step, so the default gains (k_i 0.5, k_p 0.4, at most
one nat of log λ per reading) are larger than the drift budget's per-step ones; they stay inside that law's
stability region (k_i + 2k_p < 2).

Logged with the harm signal's keys (``orthoreg.engine.metrics``): ``orthoreg/harm_fall`` (f_t), ``orthoreg/guard_alerts``
(crossings since the last log) and, in budget mode, ``orthoreg/guard_weight`` (λ in force from the next step). The
fall every rank acts on is rank 0's (broadcast), so the ranks keep one λ and stop together. The guard's state
(controller, alert state, stop step) is saved in every checkpoint
(``TrainerState.stateful_callbacks["orthoreg_margin_guard"]``, JSON) beside the probe's, and restored on resume.

Example:
    >>> orthoreg = OrthoRegCallback(OrthoRegConfig.recommended())
    >>> guard = MarginGuardCallback(MarginGuardConfig(max_fall=1.5, action="adapt"), orthoreg=orthoreg)
    >>> trainer = Trainer(..., processing_class=tokenizer, callbacks=[orthoreg, guard])
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from transformers import TrainerControl, TrainerState, TrainingArguments

from ..callback import OrthoRegCallback
from ..core.distributed import broadcast_from_main
from ..engine.metrics import GUARD_ALERTS, GUARD_WEIGHT, HARM_FALL, HARM_MARGIN_DELTA, METRIC_PREFIX, metric_names
from .budget import BudgetConfig, DriftBudgetController
from .harm_signal import HarmSignalCallback, HarmSignalError, RefusalMarginProbe

logger = logging.getLogger(__name__)

__all__ = ["MarginGuardCallback", "MarginGuardConfig"]

STATE_KEY = "orthoreg_margin_guard"
ACTIONS = ("warn", "stop", "adapt")
TERMS = ("reader", "proj", "cov")


def _guard_gains() -> BudgetConfig:
    return BudgetConfig(target=1.0, ki=0.5, kp=0.4, start="initial", floor="hold")


@dataclass
class MarginGuardConfig:
    """Settings of :class:`MarginGuardCallback` (module docstring: what each action does).

    Args:
        max_fall (`float`): B, how far (nats) the harmful requests' refusal margin may fall below the base model's
            before the guard acts (> 0).
        action (`str`, *optional*, defaults to `"warn"`): ``"warn"``, ``"stop"`` or ``"adapt"`` (budget mode).
        patience (`int`, *optional*, defaults to `1`): consecutive readings over B before ``"stop"`` acts.
        term (`str`, *optional*, defaults to `"reader"`): the term whose λ budget mode raises: ``"reader"``,
            ``"proj"`` or ``"cov"``; it must be on (λ > 0) in the linked ``OrthoRegCallback``.
        max_factor (`float`, *optional*, defaults to `100`): λ never exceeds ``max_factor`` · λ₀ (> 1).
        budget (`BudgetConfig`, *optional*): gains of the law; defaults to k_i 0.5, k_p 0.4, set point B
            (``target=1``), started at λ₀ and floored there. Its ``min_weight``/``max_weight``, when unset, are λ₀
            and ``max_factor`` · λ₀.
    """

    max_fall: float
    action: Literal["warn", "stop", "adapt"] = "warn"
    patience: int = 1
    term: Literal["reader", "proj", "cov"] = "reader"
    max_factor: float = 100.0
    budget: BudgetConfig = field(default_factory=_guard_gains)

    def __post_init__(self) -> None:
        if isinstance(self.max_fall, bool) or not isinstance(self.max_fall, (int, float)) \
                or not 0 < self.max_fall < math.inf:
            raise HarmSignalError(f"`max_fall` must be a finite number of nats > 0; got {self.max_fall!r}")
        if self.action not in ACTIONS:
            raise HarmSignalError(f"`action` must be one of {ACTIONS}; got {self.action!r}")
        if self.term not in TERMS:
            raise HarmSignalError(f"`term` must be one of {TERMS}; got {self.term!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise HarmSignalError(f"`patience` must be an int >= 1; got {self.patience!r}")
        if not (isinstance(self.max_factor, (int, float)) and 1 < self.max_factor < math.inf):
            raise HarmSignalError(f"`max_factor` must be a finite number > 1; got {self.max_factor!r}")


class MarginGuardCallback(HarmSignalCallback):
    """The harm signal, read every ``every_n_steps`` steps, with an action on its fall (module docstring).

    Put it in ``callbacks=`` after the ``OrthoRegCallback`` it adapts (``"adapt"``), or alone to warn about / stop
    a fine-tune whose refusals erode. It is a ``HarmSignalCallback``: do not add another one beside it; a linked
    ``OrthoRegCallback`` whose config logs the signal (``harm_signal_every``) leaves the reading to the guard.

    Args:
        config (`MarginGuardConfig`): the bound and the action.
        orthoreg (`OrthoRegCallback`, *optional*): the regulariser whose λ budget mode raises (required for
            ``"adapt"``).
        every_n_steps (`int`, *optional*, defaults to `5`): optimizer steps between readings.
        probe (`RefusalMarginProbe`, *optional*), tokenizer (*optional*): as for ``HarmSignalCallback``.
    """

    def __init__(self, config: MarginGuardConfig, orthoreg: OrthoRegCallback | None = None, every_n_steps: int = 5,
                 probe: RefusalMarginProbe | None = None, tokenizer: Any = None):
        super().__init__(every_n_steps, probe=probe, tokenizer=tokenizer)
        if not isinstance(config, MarginGuardConfig):
            raise TypeError(f"`config` must be a MarginGuardConfig; got {type(config).__name__}")
        self.config = config
        self.orthoreg = orthoreg
        if orthoreg is not None and orthoreg.harm_signal is not None:
            # One probe per run: the guard reads and logs the signal the linked callback would have logged.
            orthoreg.harm_signal = None
        self.controller: DriftBudgetController | None = None
        if config.action == "adapt":
            if not isinstance(orthoreg, OrthoRegCallback):
                raise HarmSignalError(
                    "MarginGuardConfig(action='adapt') raises the λ of an OrthoRegCallback: pass orthoreg=<the "
                    "OrthoRegCallback in the same Trainer>, or use action='warn'/'stop'")
            initial = getattr(orthoreg.config, f"{config.term}_weight")
            if not initial > 0:
                raise HarmSignalError(
                    f"the linked OrthoRegCallback has {config.term}_weight={initial}: budget mode raises a weight that "
                    f"is on; set OrthoRegConfig({config.term}_weight > 0) or choose MarginGuardConfig(term=...)")
            gains = config.budget
            if gains.min_weight is None or gains.max_weight is None:
                gains = BudgetConfig(**{**asdict(gains), "min_weight": gains.min_weight or initial,
                                        "max_weight": gains.max_weight or config.max_factor * initial})
            self.controller = DriftBudgetController(config.max_fall, gains, initial_weight=initial)
        self.over = False
        self.consecutive = 0
        self.alerts = 0
        self.stopped_at: int | None = None
        self.history: list[dict[str, float]] = []

    @property
    def weight(self) -> float | None:
        """λ in force for the next step (budget mode), else ``None``."""
        return None if self.controller is None else self.controller.weight

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        stored = state.stateful_callbacks.get(STATE_KEY) if state.stateful_callbacks else None
        if state.global_step > 0 and stored is not None:
            self.load_state_dict(stored)
        self._apply_weight()
        state.stateful_callbacks[STATE_KEY] = self.state_dict()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    **kwargs):
        reading = self.schedule.after_step(model, state.global_step)
        if reading is None:
            return
        # Rank 0's reading on every rank: the ranks' λ (and stop decisions) must not drift apart by rounding.
        fall = broadcast_from_main(-reading[METRIC_PREFIX + HARM_MARGIN_DELTA])
        if self.act(fall, state.global_step):
            control.should_training_stop = True
            control.should_save = True
            control.should_log = True
        extra = {HARM_FALL: fall, GUARD_ALERTS: float(self.alerts)}
        if self.controller is not None:
            extra[GUARD_WEIGHT] = self.controller.weight
        self.schedule.pending.update(metric_names(extra))
        self.alerts = 0
        state.stateful_callbacks[STATE_KEY] = self.state_dict()

    def act(self, fall: float, step: int) -> bool:
        """One reading's fall f (nats): warns on a crossing, adapts λ, and returns whether training must stop."""
        cfg = self.config
        over = fall > cfg.max_fall
        if over and not self.over:
            self.alerts += 1
            logger.warning(f"orthoreg harm-margin guard: step {step}: the refusal margin fell {fall:.2f} nats below "
                           f"the base model's, over max_fall {cfg.max_fall:g} (action: {cfg.action})")
        self.over = over
        self.consecutive = self.consecutive + 1 if over else 0
        stop = cfg.action == "stop" and self.consecutive >= cfg.patience
        if stop and self.stopped_at is None:
            self.stopped_at = step
            logger.warning(f"orthoreg harm-margin guard: stopping training at step {step} after {self.consecutive} "
                           f"reading(s) over max_fall; the checkpoint of this step is kept")
        if self.controller is not None:
            self.controller.update(fall)
            self._apply_weight()
        self.history.append({"step": step, "fall": fall, **({"weight": self.weight} if self.controller else {})})
        return stop

    def _apply_weight(self) -> None:
        if self.controller is not None:
            self.orthoreg.set_weight(self.config.term, self.controller.weight)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": None if self.controller is None else self.controller.state_dict(), "over": self.over,
                "consecutive": self.consecutive, "stopped_at": self.stopped_at, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("controller") is None) != (self.controller is None):
            raise HarmSignalError("the checkpoint's harm-margin guard ran with another action; resume with the same "
                                  "MarginGuardConfig(action=...)")
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.over, self.consecutive = bool(state["over"]), int(state["consecutive"])
        self.stopped_at = state["stopped_at"]
        self.history = list(state["history"])
