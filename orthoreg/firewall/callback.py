"""The geometric firewall: live drift monitoring with actions (warn, stop, adapt) and a drift budget.

Three pieces, one concept each:

- ``orthoreg.firewall.monitor.DriftMonitor`` measures the drift of the guarded layers' features along the harmful directions,
  in σ units of the base model (formulas there);
- ``orthoreg.firewall.budget.DriftBudgetController`` turns a drift budget into λ_proj (the control law and its stability
  there);
- this module ties them to an action: ``Firewall`` (a plain object for custom loops and OrthoLoRA) and
  ``FirewallCallback`` (its ``transformers.TrainerCallback`` adapter).

Actions when the step's drift — the largest |drift| over monitored layers and directions (``side="both"``), or the
largest positive drift, toward the harmful side (``side="harmful"``) — exceeds ``max_drift``:

- ``"warn"``: one log line per crossing, naming the layer, the direction and the drift (again only after the drift
  has come back under the threshold);
- ``"stop"``: warn, then stop training after ``patience`` consecutive steps over the threshold; in a Trainer
  ``control.should_training_stop`` and ``control.should_save`` are set, so the last checkpoint is the stopping step;
- ``"adapt"``: budget mode. ``max_drift`` is the budget and λ_proj of the linked regulariser is set after every step
  by the controller (the user states a drift, not a weight); crossings are still logged.

Logged as Trainer metrics (next to the task loss, so they reach TensorBoard/W&B): ``firewall/drift/layer_i/dir_j``,
``firewall/max_drift``, ``firewall/cov_change/layer_i``, ``firewall/alerts`` (crossings since the last log),
``firewall/proj_weight`` (budget mode: the weight's trajectory). The monitor's base statistics and the controller's
state are saved in every checkpoint (``TrainerState.stateful_callbacks["orthoreg_firewall"]``, JSON) and restored on
resume, not recomputed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..callback import OrthoRegCallback
from ..config import OrthoRegConfig
from ..core.capture import MASK_POLICIES
from ..core.trainer_callbacks import move_ahead_of_reporters, report_metrics
from ..directions.harmful import HarmfulDirections
from .budget import BudgetConfig, DriftBudgetController
from .monitor import DriftMonitor, DriftReading

logger = logging.getLogger(__name__)

__all__ = ["Firewall", "FirewallCallback", "FirewallConfig", "FirewallEvent", "budget_callbacks"]

STATE_KEY = "orthoreg_firewall"
METRIC_PREFIX = "firewall/"
ACTIONS = ("warn", "stop", "adapt")
SIDES = ("both", "harmful")


@dataclass
class FirewallConfig:
    """Settings of the firewall (module docstring: what each action does).

    Args:
        max_drift (`float`): threshold and budget, in σ units of the base model (``orthoreg.firewall.monitor``).
        action (`str`, *optional*, defaults to `"warn"`): ``"warn"``, ``"stop"`` or ``"adapt"`` (budget mode).
        side (`str`, *optional*, defaults to `"both"`): ``"both"`` acts on |drift|; ``"harmful"`` only on drift
            toward the harmful side (+u; directions extracted as harmful − harmless point that way).
        patience (`int`, *optional*, defaults to `1`): consecutive steps over ``max_drift`` before ``"stop"`` acts.
        layers (*optional*): layers to monitor; defaults to the linked regulariser's guarded layers that have
            directions, else every layer with directions.
        mask (`str`, *optional*): tokens that count; defaults to the linked regulariser's ``mask``, else
            ``"attention"``.
        track_covariance (`bool`, *optional*, defaults to `True`): also log the covariance penalty's change.
        probe (list of batches, *optional*): a fixed probe set (model kwargs: ``input_ids``, ``attention_mask``, …).
            Given, the drift is measured on it (eval mode, no grad, one forward of the set every ``probe_every``
            steps) instead of on the training tokens: no batch-composition noise, and it measures what the update
            does to *other* inputs (e.g. general prompts), which is what emergent misalignment is about. The base
            statistics come from the same set at attach time.
        probe_every (`int`, *optional*, defaults to `1`): steps between probe measurements.
        budget (`BudgetConfig`, *optional*): controller gains and limits for ``"adapt"``.
    """

    max_drift: float = field(metadata={"help": "threshold / budget in base-model σ units"})
    action: Literal["warn", "stop", "adapt"] = field(default="warn", metadata={"choices": ACTIONS})
    side: Literal["both", "harmful"] = field(default="both", metadata={"choices": SIDES})
    patience: int = 1
    layers: Any = None
    mask: Literal["attention", "labels"] | None = None
    track_covariance: bool = True
    probe: Any = field(default=None, repr=False)
    probe_every: int = 1
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_drift, (int, float)) and 0 < self.max_drift < math.inf):
            raise ValueError(f"`max_drift` must be a finite number > 0 (σ units); got {self.max_drift!r}")
        self.max_drift = float(self.max_drift)
        if self.action not in ACTIONS:
            raise ValueError(f"`action` must be one of {ACTIONS}; got {self.action!r}")
        if self.side not in SIDES:
            raise ValueError(f"`side` must be one of {SIDES}; got {self.side!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"`patience` must be an int >= 1; got {self.patience!r}")
        if self.mask is not None and self.mask not in MASK_POLICIES:
            raise ValueError(f"`mask` must be one of {MASK_POLICIES}; got {self.mask!r}")
        if not isinstance(self.probe_every, int) or self.probe_every < 1:
            raise ValueError(f"`probe_every` must be an int >= 1; got {self.probe_every!r}")
        if self.probe is not None:
            self.probe = list(self.probe)
            if not self.probe or not all(isinstance(b, Mapping) for b in self.probe):
                raise ValueError("`probe` must be a non-empty list of batches (dicts of model kwargs)")
        if isinstance(self.budget, Mapping):
            self.budget = BudgetConfig(**self.budget)


@dataclass
class FirewallEvent:
    """What ``Firewall.update`` saw and did for one step.

    Attributes:
        reading: the monitor's reading (``None`` on the calibration step).
        drift: the acted-on drift (largest |drift|, or largest positive drift with ``side="harmful"``).
        layer, direction: where it is.
        crossed: the drift went over ``max_drift`` at this step (a warning was logged).
        stop: training should stop (``action="stop"``, over the threshold for ``patience`` steps).
        weight: λ_proj for the next step (``action="adapt"``), else ``None``.
    """

    reading: DriftReading | None
    drift: float = 0.0
    layer: int | None = None
    direction: int | None = None
    crossed: bool = False
    stop: bool = False
    weight: float | None = None


class Firewall:
    """Drift monitor + action (+ budget controller), without a Trainer.

    Args:
        config (`FirewallConfig`): threshold/budget and action.
        directions (`HarmfulDirections`): the harmful subspaces (as given to the regulariser).
        target (`OrthoRegConfig`, *optional*): the regulariser's config whose ``proj_weight`` budget mode adapts
            (``callback.config``, ``ortho_lora.config``); required for ``action="adapt"``. The regulariser reads
            ``proj_weight`` on every forward, so the new weight applies from the next step.

    Example (custom loop, OrthoLoRA):
        >>> model = OrthoLoRA(peft_model, OrthoRegConfig(layers=[6, 8], proj_weight=1.0), directions)
        >>> firewall = Firewall(FirewallConfig(max_drift=1.0, action="adapt"), directions, target=model.config)
        >>> firewall.attach(model)
        >>> for batch in loader:
        ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        ...     event = firewall.update()          # sets model.config.proj_weight for the next step
        ...     log(firewall.metrics())
        ...     if event.stop: break
    """

    def __init__(self, config: FirewallConfig, directions: HarmfulDirections, target: OrthoRegConfig | None = None):
        if not isinstance(config, FirewallConfig):
            raise TypeError(f"Firewall needs a FirewallConfig; got {type(config).__name__}")
        if config.action == "adapt" and target is None:
            raise ValueError(
                "FirewallConfig(action='adapt') adapts the projection weight of a regulariser: pass `target=` (the "
                "OrthoRegConfig of the OrthoRegCallback/OrthoLoRA), or use orthoreg.firewall.callback.budget_callbacks(...)"
            )
        if target is not None and target.anchor == "absolute" and config.action == "adapt":
            logger.warning("budget mode with anchor='absolute': the penalty pulls toward the origin, not the base "
                           "statistics the drift is measured from; anchor='base_mean' or 'paired' matches the monitor")
        if config.action == "adapt" and config.probe is not None:
            logger.warning("budget mode on a probe set: the penalty acts on the training tokens, and the drift of other "
                           "inputs may not respond to λ (in the toy world it did not); budget the training-token drift "
                           "(no probe) and use a probe for warn/stop")
        self.config = config
        self.directions = directions
        self.target = target
        layers = config.layers
        if layers is None and target is not None:
            layers = target.layers
        self.monitor = DriftMonitor(
            directions, layers, mask=config.mask or (target.mask if target is not None else "attention"),
            track_covariance=config.track_covariance,
        )
        self.controller: DriftBudgetController | None = None
        if config.action == "adapt":
            initial = config.budget.initial_weight or (target.proj_weight if target.proj_weight > 0 else 1.0)
            self.controller = DriftBudgetController(config.max_drift, config.budget, initial_weight=initial)
            target.proj_weight = self.controller.weight
        self.over: dict[tuple[int, int], bool] = {}  # (layer, direction) → currently over the threshold
        self.consecutive = 0
        self.alerts = 0  # crossings since the last metrics() call
        self.stopped_at: int | None = None
        self.history: list[dict[str, float]] = []  # one entry per reading: step, drift, weight

    # ------------------------------------------------------------------ hooks and calibration
    def attach(self, model: nn.Module) -> Firewall:
        """Hooks the monitor into ``model``; with a probe set, records the base statistics on it now (unless restored
        by ``load_state_dict`` — call that first when resuming)."""
        layers_path = self.target.layers_path if self.target is not None else None
        probe = self.config.probe
        self.monitor.attach(model, layers_path=layers_path, hooks=probe is None)
        self.model = model
        if probe is not None:
            device = next(model.parameters()).device
            self._probe = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                           for b in probe]
            if not self.monitor.calibrated:
                self.monitor.calibrate(model, self._probe)
        return self

    def detach(self) -> None:
        self.monitor.detach()

    def calibrate(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], regularizer: Any = None) -> None:
        """Base statistics from a calibration set (else the first step's micro-batches, or the probe set,
        calibrate). With
        ``regularizer`` (an ``OrthoRegularizer`` with ``anchor="base_mean"``), its reference r is recorded on the same
        batches, so the penalty and the monitor share one origin."""
        batches = list(batches)
        self.monitor.calibrate(model, batches)
        if regularizer is not None and regularizer.config.anchor == "base_mean":
            regularizer.calibrate(model, iter(batches))

    # ------------------------------------------------------------------ per step
    def update(self, step: int | None = None) -> FirewallEvent:
        """Closes an optimizer step: reads the drift, logs crossings, decides on stopping, adapts λ. Call it on every
        rank after every optimizer step (the reading is all-reduced)."""
        probe = self.config.probe
        if probe is not None:
            if (self.monitor.steps + 1) % self.config.probe_every:
                self.monitor.steps += 1
                return FirewallEvent(None, weight=self.controller.weight if self.controller else None)
            self.monitor.observe_batches(self.model, self._probe)
        reading = self.monitor.update()
        step = self.monitor.steps if step is None else step
        if reading is None:
            return FirewallEvent(None, weight=self.controller.weight if self.controller else None)
        cfg = self.config
        drift, layer, direction = reading.largest(cfg.side)
        crossed = False
        for lay, values in reading.drift.items():
            for j, value in enumerate(values):
                over = (abs(value) if cfg.side == "both" else value) > cfg.max_drift
                if over and not self.over.get((lay, j), False):
                    crossed = True
                    self.alerts += 1
                    logger.warning(
                        f"orthoreg firewall: step {step}: layer {lay}, harmful direction {j}: drift {value:+.2f}σ "
                        f"exceeds max_drift {cfg.max_drift:g}σ (action: {cfg.action})"
                    )
                self.over[(lay, j)] = over
        self.consecutive = self.consecutive + 1 if drift > cfg.max_drift else 0
        stop = cfg.action == "stop" and self.consecutive >= cfg.patience
        if stop and self.stopped_at is None:
            self.stopped_at = step
            logger.warning(f"orthoreg firewall: stopping training at step {step}: drift {drift:.2f}σ over "
                           f"max_drift {cfg.max_drift:g}σ for {self.consecutive} step(s) (layer {layer}, direction "
                           f"{direction}); the checkpoint of this step is kept")
        weight = None
        if self.controller is not None:
            weight = self.controller.update(drift)
            self.target.proj_weight = weight
        self.history.append({"step": step, "drift": drift, **({"proj_weight": weight} if weight is not None else {})})
        return FirewallEvent(reading, drift, layer, direction, crossed, stop, weight)

    def metrics(self) -> dict[str, float]:
        """The latest reading (``drift/layer_i/dir_j``, ``max_drift``, ``cov_change/layer_i``), ``alerts`` since the
        last call and, in budget mode, ``proj_weight`` (the weight in force for the next step)."""
        out = self.monitor.metrics(self.config.side)
        if not out:
            return {}
        out["alerts"] = float(self.alerts)
        self.alerts = 0
        if self.controller is not None:
            out["proj_weight"] = self.controller.weight
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON: the monitor's base statistics, the controller's state, the action bookkeeping."""
        return {
            "format_version": 1,
            "config": {k: v for k, v in asdict(self.config).items() if k not in ("layers", "probe")},
            "monitor": self.monitor.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "consecutive": self.consecutive,
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format_version") != 1:
            raise ValueError(f"unknown firewall state format {state.get('format_version')!r}")
        self.monitor.load_state_dict(state["monitor"])
        if self.controller is not None:
            if state.get("controller") is None:
                raise ValueError("the checkpoint's firewall was not in budget mode; resume with the same FirewallConfig")
            self.controller.load_state_dict(state["controller"])
            self.target.proj_weight = self.controller.weight
        self.consecutive = int(state.get("consecutive", 0))
        self.stopped_at = state.get("stopped_at")


class FirewallCallback(TrainerCallback):
    """The firewall in any ``transformers.Trainer`` (and TRL's trainers): monitoring, warn/stop, drift budget.

    Put it in ``callbacks=`` next to the ``OrthoRegCallback`` it adapts (budget mode), or alone to monitor and
    warn/stop a plain fine-tune. Metrics and saved state: see the module docstring.

    Args:
        config (`FirewallConfig`): threshold/budget and action.
        directions (`HarmfulDirections`): harmful subspaces.
        orthoreg (`OrthoRegCallback`, *optional*): the regulariser whose ``proj_weight`` budget mode adapts; its
            guarded layers and mask are the monitor's defaults.
        calibration (iterable of batches, *optional*): model kwargs for ``Firewall.calibrate`` at train start
            (step 0 only), instead of calibrating on the first step's micro-batches; moved to the model's device.

    Example:
        >>> config = OrthoRegConfig(layers=[6, 8], anchor="base_mean")
        >>> callbacks = budget_callbacks(config, directions, FirewallConfig(max_drift=1.0, action="adapt"))
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
        >>> # or monitor a plain run and stop it:
        >>> trainer = Trainer(..., callbacks=[FirewallCallback(FirewallConfig(max_drift=2.0, action="stop"), directions)])
    """

    def __init__(self, config: FirewallConfig, directions: HarmfulDirections, orthoreg: OrthoRegCallback | None = None,
                 calibration: Iterable[Mapping[str, torch.Tensor]] | None = None):
        if orthoreg is not None and not isinstance(orthoreg, OrthoRegCallback):
            raise TypeError(f"`orthoreg` must be the OrthoRegCallback to adapt; got {type(orthoreg).__name__}")
        self.orthoreg = orthoreg
        self.firewall = Firewall(config, directions, target=orthoreg.config if orthoreg is not None else None)
        self.calibration = calibration
        self._reported_step = -1

    @property
    def config(self) -> FirewallConfig:
        return self.firewall.config

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        move_ahead_of_reporters(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        if model is None:
            raise ValueError("FirewallCallback received no model in on_train_begin")
        move_ahead_of_reporters(self)
        stored = state.stateful_callbacks.get(STATE_KEY) if state.stateful_callbacks else None
        if state.global_step > 0:
            if stored is not None:
                self.firewall.load_state_dict(stored)  # base statistics restored, never recomputed on a tuned model
            elif not self.firewall.monitor.calibrated:
                raise ValueError(
                    f"resuming at step {state.global_step} but the checkpoint has no firewall state (it was written "
                    "without FirewallCallback), so the base model's drift statistics cannot be restored; start from "
                    "step 0, or call callback.firewall.calibrate(base_model, batches) on the base model first"
                )
        if not self.firewall.monitor.attached:
            self.firewall.attach(model)  # with a probe set and nothing restored, calibrates on it here (step 0)
        if self.calibration is not None and not self.firewall.monitor.calibrated:
            device = next(model.parameters()).device
            batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                       for b in self.calibration]
            regularizer = self.orthoreg.regularizer if self.orthoreg is not None else None
            if regularizer is not None and not regularizer.attached:
                regularizer.attach(model)
            self.firewall.calibrate(model, batches, regularizer=regularizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        event = self.firewall.update(step=state.global_step)
        if event.stop:
            control.should_training_stop = True
            control.should_save = True
            control.should_log = True
        # Written into TrainerState so every later checkpoint's trainer_state.json (JSON, no pickle) carries it.
        state.stateful_callbacks[STATE_KEY] = self.firewall.state_dict()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None:
            return
        # Every rank reports (report_metrics may all-gather); a log without a new reading reports nothing.
        metrics = self.firewall.metrics() if state.global_step != self._reported_step else {}
        self._reported_step = state.global_step
        report_metrics(metrics, METRIC_PREFIX, logs, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.firewall.detach()


def budget_callbacks(config: OrthoRegConfig, directions: HarmfulDirections, firewall: FirewallConfig,
                     calibration: Iterable[Mapping[str, torch.Tensor]] | None = None) -> list[TrainerCallback]:
    """``[OrthoRegCallback, FirewallCallback]`` wired together: pass the list as the Trainer's ``callbacks=``.

    With ``firewall.action="adapt"`` the regulariser's ``proj_weight`` becomes the controller's output (its
    configured value is the initial weight unless ``firewall.budget.initial_weight`` is set).
    """
    orthoreg = OrthoRegCallback(config, directions)
    return [orthoreg, FirewallCallback(firewall, directions, orthoreg=orthoreg, calibration=calibration)]
