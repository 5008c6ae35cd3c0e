r"""The drift-budget controller: adapts λ_proj so the measured drift stays within a budget, with the smallest λ.

The user states ``max_drift`` B (σ units, see ``orthoreg.firewall.monitor``) instead of λ. After every optimizer step the
controller reads the step's drift D_t (the largest over guarded layers and directions) and updates u = log λ with a
velocity-form PI law on the *log* error:

.. math::

    \tilde D_t &= (1-a)\,D_t + a\,\tilde D_{t-1}                      && \text{optional EMA filter, } a = \texttt{ema} \\
    e_t &= \mathrm{clip}\big(\log(\tilde D_t / D^\star),\ \pm e_{max}\big),  && D^\star = \texttt{target}\cdot B \\
    u_{t+1} &= \mathrm{clip}\big(u_t + \mathrm{clip}(k_i e_t + k_p (e_t - e_{t-1}),\ \pm\Delta_{max}),
               \ [\log\lambda_{min}, \log\lambda_{max}]\big) \\
    \lambda_{t+1} &= 0 \text{ if } u_{t+1} = \log\lambda_{min} \text{ and } e_t < 0, \text{ else } e^{u_{t+1}}

**Why log-space.** Near equilibrium the drift a fixed λ sustains behaves like D ∝ λ^{-γ} with 0 < γ ≤ 1 (the task
pushes at a roughly constant rate; the anchored projection penalty pulls back in proportion to λ·D, so D* ≈ push/λ
once λ dominates, γ → 1, and γ → 0 where λ is too small to matter). In log coordinates the plant is then linear,
log D = c − γ log λ, with a gain bounded by 1 whatever the model, the layer scale or the penalty's units: one set of
gains fits every model, and λ spans decades in a few steps without ever becoming negative.

**Stability.** For the static plant above with one step of delay, the error obeys
e_{t+1} = (1 − γ(k_i + k_p)) e_t + γ k_p e_{t−1}; by the Jury criterion it converges for every γ ∈ (0, 1] iff
k_i > 0, k_p < 1 and k_i + 2 k_p < 2 (the defaults k_i = 0.2, k_p = 0.3 give 0.8). Training adds lag (the drift
accumulates over steps: a first-order plant with time constant τ); the proportional term adds the damping that lag
takes away. ``tests/test_budget.py`` checks convergence, bounded overshoot and settling on step, ramp and noisy
disturbances for τ from 1 to 20 steps and γ from 0.3 to 1.

**Anti-windup and floor.** The integrator *is* u (velocity form), clamped to [log λ_min, log λ_max], so it never
winds up beyond what the actuator can do: when the budget is unreachable at λ_max, λ sits there and comes down at
once when the drift falls. When the drift stays below the set point at λ_min, the output is exactly 0 (the floor:
no penalty when the task does not push along the harmful directions); it restarts from λ_min as soon as the drift
exceeds the set point again. Each update changes λ by at most a factor exp(Δ_max), and |e| ≤ e_max bounds the
reaction to a single outlier step.

The set point is ``target`` · B (default 0.8 B) rather than B itself, so that step-to-step noise around the set point
stays inside the budget.

**Where it starts.** ``start="min"`` (default) starts at λ_min and raises λ only as far as the drift requires: the
smallest weight, at the price of a transient — the drift may exceed the budget for the ~log(λ*/λ_min)/(k_i e_max)
steps λ takes to climb (≈ 0.4 nats per step when the drift is far over). ``start="initial"`` starts at
``initial_weight`` (the regulariser's configured ``proj_weight``) and lowers it: a safer transient, but the early
steps carry more penalty than needed (in the toy world this costs narrow-task accuracy; benchmarks/README_firewall.md).
λ_min > 0, so the regulariser's ``anchor="base_mean"`` reference is still recorded on the first step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["BudgetConfig", "DriftBudgetController"]


@dataclass
class BudgetConfig:
    """Gains and limits of :class:`DriftBudgetController` (module docstring: the law and its stability).

    Args:
        target (`float`, *optional*, defaults to `0.8`): set point as a fraction of ``max_drift`` (0 < target ≤ 1).
        ki (`float`, *optional*, defaults to `0.2`): integral gain k_i on the log error (per update).
        kp (`float`, *optional*, defaults to `0.3`): proportional gain k_p on the change of the log error.
        initial_weight (`float`, *optional*): the weight scale: λ for the first step(s) with ``start="initial"``, and
            the reference for the default limits. Defaults to the regulariser's configured ``proj_weight``, else 1.
        min_weight (`float`, *optional*): λ_min (> 0), below which λ is switched off (0), and the first λ with
            ``start="min"``; defaults to 1e-4 · initial.
        max_weight (`float`, *optional*): λ_max; defaults to 1e4 · initial.
        max_log_step (`float`, *optional*, defaults to `1.0`): Δ_max, the largest change of log λ per update.
        error_clip (`float`, *optional*, defaults to `2.0`): e_max, the largest |log(D / D*)| acted on.
        ema (`float`, *optional*, defaults to `0.0`): weight a of the previous filtered drift (0: no filter).
        start (`str`, *optional*, defaults to `"min"`): first λ: ``"min"`` (λ_min, then up as needed) or
            ``"initial"`` (``initial_weight``, then down).
        floor (`str`, *optional*, defaults to `"off"`): what λ does when the reading stays below the set point at
            λ_min: ``"off"`` switches the penalty off (λ = 0, the drift budget's floor), ``"hold"`` keeps λ_min (the
            harm-margin guard's floor: the user's own λ is never lowered).
    """

    target: float = field(default=0.8, metadata={"help": "set point as a fraction of max_drift"})
    ki: float = field(default=0.2, metadata={"help": "integral gain on log(drift / set point)"})
    kp: float = field(default=0.3, metadata={"help": "proportional gain on the change of the log error"})
    initial_weight: float | None = field(default=None, metadata={"help": "λ before the first measurement"})
    min_weight: float | None = field(default=None, metadata={"help": "λ_min; below it λ is 0"})
    max_weight: float | None = field(default=None, metadata={"help": "λ_max"})
    max_log_step: float = field(default=1.0, metadata={"help": "largest |Δ log λ| per update"})
    error_clip: float = field(default=2.0, metadata={"help": "largest |log(drift / set point)| acted on"})
    ema: float = field(default=0.0, metadata={"help": "EMA weight of the previous filtered drift"})
    start: Literal["min", "initial"] = field(default="min", metadata={"help": "first λ", "choices": ("min", "initial")})
    floor: Literal["off", "hold"] = field(default="off", metadata={"help": "below the set point at λ_min: 0 or λ_min",
                                                                   "choices": ("off", "hold")})

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"`target` must be in (0, 1]; got {self.target!r}")
        if not self.ki > 0:
            raise ValueError(f"`ki` must be > 0 (the integral action removes the steady-state error); got {self.ki!r}")
        if not 0 <= self.kp < 1 or self.ki + 2 * self.kp >= 2:
            raise ValueError(
                f"gains ki={self.ki!r}, kp={self.kp!r} are outside the stability region 0 <= kp < 1, ki + 2·kp < 2 "
                "(see orthoreg.firewall.budget); lower them"
            )
        for name in ("initial_weight", "min_weight", "max_weight"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}")
        if self.min_weight is not None and self.max_weight is not None and self.min_weight >= self.max_weight:
            raise ValueError(f"`min_weight` ({self.min_weight}) must be below `max_weight` ({self.max_weight})")
        if not self.max_log_step > 0 or not self.error_clip > 0:
            raise ValueError("`max_log_step` and `error_clip` must be > 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"`ema` must be in [0, 1); got {self.ema!r}")
        if self.start not in ("min", "initial"):
            raise ValueError(f"`start` must be 'min' or 'initial'; got {self.start!r}")
        if self.floor not in ("off", "hold"):
            raise ValueError(f"`floor` must be 'off' or 'hold'; got {self.floor!r}")


class DriftBudgetController:
    """Velocity-form PI controller on log(drift), acting on log λ (module docstring).

    A pure object: feed it one drift reading per optimizer step, read ``weight``. It holds no tensors and its whole
    state is JSON (``state_dict``), so a resumed run continues the same trajectory.

    Args:
        max_drift (`float`): the budget B in σ units (> 0).
        config (`BudgetConfig`, *optional*): gains and limits.
        initial_weight (`float`, *optional*): overrides ``config.initial_weight``.

    Example:
        >>> controller = DriftBudgetController(max_drift=1.0)
        >>> for drift in measured:              # one value per optimizer step
        ...     regularizer.config.proj_weight = controller.update(drift)
    """

    def __init__(self, max_drift: float, config: BudgetConfig | None = None, initial_weight: float | None = None):
        if not (isinstance(max_drift, (int, float)) and 0 < max_drift < math.inf):
            raise ValueError(f"`max_drift` must be a finite number > 0 (σ units); got {max_drift!r}")
        self.max_drift = float(max_drift)
        self.config = config or BudgetConfig()
        init = initial_weight if initial_weight is not None else self.config.initial_weight
        init = 1.0 if init is None or init <= 0 else float(init)
        self.min_weight = float(self.config.min_weight or 1e-4 * init)
        self.max_weight = float(self.config.max_weight or 1e4 * init)
        if not self.min_weight < self.max_weight:
            raise ValueError(f"`min_weight` ({self.min_weight}) must be below `max_weight` ({self.max_weight})")
        init = self.min_weight if self.config.start == "min" else min(max(init, self.min_weight), self.max_weight)
        # State: u = log λ (the integrator), the previous log error, the filtered drift, whether λ is off (0).
        self.log_weight = math.log(init)
        self.prev_error: float | None = None
        self.filtered: float | None = None
        self.off = False
        self.updates = 0

    @property
    def set_point(self) -> float:
        """D* = target · max_drift."""
        return self.config.target * self.max_drift

    @property
    def weight(self) -> float:
        """The current λ (0 when switched off at the floor)."""
        return 0.0 if self.off else math.exp(self.log_weight)

    def update(self, drift: float) -> float:
        """Takes the drift measured on the last step (σ units, ≥ 0) and returns λ for the next step.

        A non-finite reading is ignored (λ unchanged).
        """
        if drift is None or not math.isfinite(drift):
            return self.weight
        cfg = self.config
        drift = max(float(drift), 0.0)
        self.filtered = drift if self.filtered is None else cfg.ema * self.filtered + (1 - cfg.ema) * drift
        # log(0) is -inf: a drift far below the set point is a full-size negative error, clipped.
        ratio = self.filtered / self.set_point
        error = -cfg.error_clip if ratio <= 0 else max(-cfg.error_clip, min(cfg.error_clip, math.log(ratio)))
        prev = error if self.prev_error is None else self.prev_error
        step = cfg.ki * error + cfg.kp * (error - prev)
        step = max(-cfg.max_log_step, min(cfg.max_log_step, step))
        low, high = math.log(self.min_weight), math.log(self.max_weight)
        if self.off and error <= 0:
            step = 0.0  # stays off while within the set point
        self.log_weight = max(low, min(high, self.log_weight + step))
        self.off = self.config.floor == "off" and self.log_weight <= low and error < 0
        self.prev_error = error
        self.updates += 1
        return self.weight

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "max_drift": self.max_drift, "config": asdict(self.config), "log_weight": self.log_weight,
            "prev_error": self.prev_error, "filtered": self.filtered, "off": self.off, "updates": self.updates,
            "min_weight": self.min_weight, "max_weight": self.max_weight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["max_drift"]) != self.max_drift:
            raise ValueError(
                f"the checkpoint's drift budget is {state['max_drift']}, this run's is {self.max_drift}; resume with the "
                "same FirewallConfig(max_drift=...)"
            )
        self.log_weight = float(state["log_weight"])
        self.prev_error = None if state["prev_error"] is None else float(state["prev_error"])
        self.filtered = None if state["filtered"] is None else float(state["filtered"])
        self.off = bool(state["off"])
        self.updates = int(state["updates"])
        self.min_weight, self.max_weight = float(state["min_weight"]), float(state["max_weight"])
