"""DriftBudgetController on synthetic drift signals: step, ramp and noisy disturbances through a lagged plant.

The plant stands in for fine-tuning: the task pushes the drift toward ``push(t)``, the penalty holds it back,
and the drift follows with a first-order lag (time constant 1/β steps):

    D*(λ) = push / (1 + (λ/λ_ref)^γ),     D_{t+1} = D_t + β (D*(λ_t) − D_t),     measured D_t · (1 + noise·ε_t).

γ is the plant's log-log gain at large λ (orthoreg.firewall.budget's stability argument holds for γ ≤ 1), β = 1 is a plant
with no lag; the toy world's drift settles within a few steps (β ≈ 0.2–0.5). Tolerances are stated per test.
"""

import math
import random

import pytest

from orthoreg.firewall.budget import BudgetConfig, DriftBudgetController

B = 1.0  # the budget
SET_POINT = 0.8 * B  # default target


def plant_run(push, beta=0.3, gamma=1.0, lam_ref=1.0, steps=300, noise=0.0, seed=0, controller=None):
    rng = random.Random(seed)
    controller = controller or DriftBudgetController(B)
    drift, trace = 0.0, []
    for t in range(steps):
        lam = controller.weight
        target = push(t) / (1 + (lam / lam_ref) ** gamma)
        drift += beta * (target - drift)
        measured = max(drift * (1 + noise * rng.gauss(0, 1)), 0.0)
        controller.update(measured)
        trace.append((drift, lam))
    return trace, controller


def lam_needed(push, gamma=1.0, lam_ref=1.0, set_point=SET_POINT):
    """The smallest λ that holds the drift at the set point: push / (1 + (λ/λ_ref)^γ) = set point."""
    return lam_ref * (push / set_point - 1) ** (1 / gamma)


PLANTS = [(beta, gamma) for beta in (1.0, 0.5, 0.2, 0.05) for gamma in (1.0, 0.5)]


@pytest.mark.parametrize("beta, gamma", PLANTS)
def test_step_disturbance_settles_at_the_set_point_with_the_smallest_weight(beta, gamma):
    # The push sits under the set point for 200 steps, then jumps to 5x the budget.
    trace, controller = plant_run(lambda t: 0.5 if t < 200 else 5.0, beta=beta, gamma=gamma, steps=500)
    # Under the set point λ walks down to λ_min at ~0.1 nats/step (|log(0.5/0.8)| · k_i) and switches off.
    assert all(lam == 0.0 for _, lam in trace[120:200]), "push under the set point: λ must reach the floor, 0"
    drifts = [d for d, _ in trace[-50:]]
    # Settled: within ±5% of the set point and no residual oscillation (spread < 2% of the budget).
    assert all(abs(d - SET_POINT) < 0.05 * SET_POINT for d in drifts)
    assert max(drifts) - min(drifts) < 0.02 * B
    # Smallest weight: λ is the one that holds the set point (±10%), not a larger safe value.
    assert controller.weight == pytest.approx(lam_needed(5.0, gamma), rel=0.1)
    # No blow-up: λ overshoots its final value by < 5x for lags up to 5 steps; a 20-step lag (β = 0.05) lets λ
    # climb for longer before the drift responds (measured: ~40x, settled 140 steps after the step).
    overshoot = max(lam for _, lam in trace) / controller.weight
    settle = next(t for t in range(200, 500) if all(abs(d - SET_POINT) < 0.1 * SET_POINT for d, _ in trace[t:]))
    if beta >= 0.2:
        assert overshoot < 5 and settle - 200 < 80
    else:
        assert overshoot < 100 and settle - 200 < 200


@pytest.mark.parametrize("beta", [1.0, 0.3, 0.05])
def test_ramp_is_tracked_within_the_budget(beta):
    # The push grows linearly from 1 to 20x the budget; the controller must keep the drift near the set point.
    trace, _ = plant_run(lambda t: 1.0 + 19.0 * t / 400, beta=beta, steps=400)
    drifts = [d for d, _ in trace[100:]]
    assert max(drifts) < 1.05 * B, "ramp: the drift stays within the budget (+5%) once tracking"
    assert sum(drifts) / len(drifts) == pytest.approx(SET_POINT, rel=0.1)


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_noisy_measurements_do_not_make_the_weight_oscillate(noise):
    trace, _ = plant_run(lambda t: 5.0, beta=0.3, steps=600, noise=noise, seed=1)
    tail = trace[200:]
    lams = [lam for _, lam in tail]
    mean_lam = sum(lams) / len(lams)
    cv = math.sqrt(sum((x - mean_lam) ** 2 for x in lams) / len(lams)) / mean_lam
    # Multiplicative noise of 10–30% per step moves λ by at most ~25% (coefficient of variation), no drift-off.
    assert cv < 0.25
    assert max(lams) < 3 * lam_needed(5.0) and min(lams) > lam_needed(5.0) / 3
    drifts = [d for d, _ in tail]
    # The true drift's average stays within the budget (set point ± 15%: log-error noise biases it slightly).
    assert sum(drifts) / len(drifts) == pytest.approx(SET_POINT, rel=0.15)
    assert sum(drifts) / len(drifts) < B


def test_anti_windup_unreachable_budget_then_recovery():
    # Budget unreachable (push 1e6x) for 200 steps: λ saturates at λ_max instead of winding up; once the push
    # drops, λ leaves the limit immediately and settles as fast as from a fresh start.
    config = BudgetConfig(max_weight=100.0)
    trace, controller = plant_run(lambda t: 1e6 if t < 200 else 5.0, controller=DriftBudgetController(B, config),
                                  beta=1.0, steps=400)
    assert trace[199][1] == pytest.approx(100.0)
    assert trace[202][1] < 100.0, "λ comes off the limit at the first step after the push drops"
    assert controller.weight == pytest.approx(lam_needed(5.0), rel=0.1)
    settle = next(t for t in range(200, 400) if all(abs(d - SET_POINT) < 0.1 * SET_POINT for d, _ in trace[t:]))
    assert settle - 200 < 40


def test_floor_switches_off_and_restarts():
    controller = DriftBudgetController(B, initial_weight=1.0)
    for _ in range(60):
        controller.update(0.0)
    assert controller.weight == 0.0 and controller.off
    assert controller.update(0.5 * SET_POINT) == 0.0, "stays off while within the set point"
    restarted = controller.update(3.0)
    assert controller.min_weight < restarted <= controller.min_weight * math.exp(1.0), "restarts from λ_min"


def test_each_update_is_rate_limited():
    controller = DriftBudgetController(B, BudgetConfig(max_log_step=0.3), initial_weight=1.0)
    before = controller.weight
    controller.update(1e9)  # k_i · e_max = 0.4 > Δ_max
    assert controller.weight == pytest.approx(before * math.exp(0.3))
    controller.update(float("nan"))  # ignored
    assert controller.weight == pytest.approx(before * math.exp(0.3))


def test_state_round_trip_continues_the_same_trajectory():
    a = DriftBudgetController(B)
    for d in (3.0, 2.5, 1.7):
        a.update(d)
    b = DriftBudgetController(B)
    b.load_state_dict(a.state_dict())
    assert [a.update(x) for x in (1.2, 0.9, 0.4)] == [b.update(x) for x in (1.2, 0.9, 0.4)]
    with pytest.raises(ValueError, match="drift budget is 1.0"):
        DriftBudgetController(2.0).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ki=0.0), "`ki` must be > 0"),
        (dict(ki=1.0, kp=0.6), "stability region"),
        (dict(target=1.5), "`target`"),
        (dict(min_weight=10.0, max_weight=1.0), "must be below"),
        (dict(ema=1.0), "`ema`"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetConfig(**kwargs)


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_drift"):
        DriftBudgetController(0.0)


def test_start_at_min_or_at_the_initial_weight():
    low = DriftBudgetController(B, initial_weight=2.0)
    assert low.weight == pytest.approx(2e-4), "start='min': λ_min = 1e-4 · the weight scale"
    high = DriftBudgetController(B, BudgetConfig(start="initial"), initial_weight=2.0)
    assert high.weight == 2.0
    high.update(0.1 * SET_POINT)
    assert high.weight < 2.0, "under the set point the initial weight comes down"
    trace, controller = plant_run(lambda t: 5.0, beta=0.3, steps=300,
                                  controller=DriftBudgetController(B, BudgetConfig(start="initial"), 100.0))
    assert controller.weight == pytest.approx(lam_needed(5.0), rel=0.1)  # the same λ, reached from above
