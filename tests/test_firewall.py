"""DriftMonitor against a hand computation, which forwards it counts, the Firewall's actions in a real Trainer
(warn, stop with a kept checkpoint, adapt), the metrics, and resume (calibration restored, not recomputed)."""

import copy
import json
import logging
import math
from unittest.mock import patch

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from orthoreg import HarmfulDirections, OrthoRegConfig
from orthoreg.engine.regularizer import OrthoRegularizer
from orthoreg.firewall.callback import Firewall, FirewallCallback, FirewallConfig, budget_callbacks
from orthoreg.firewall.monitor import DriftMonitor
from tests.models import tiny_model
from tests.trainer_harness import LogRecorder
from tests.trainer_harness import make_trainer as harness_trainer


def dirs(layers=(1, 2), d=32, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(k, d, generator=g) for i in layers})


def batch(seed, n=4, T=7, pad_last=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[-1, T - pad_last:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hidden(model, b, layer):
    """The output of decoder layer ``layer`` (a plain hook: ``hidden_states[-1]`` is after the final norm)."""
    captured = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(
        o, tuple) else o))
    try:
        with torch.no_grad():
            model(**b)
    finally:
        handle.remove()
    return captured[0].double()


def ref_cov(h, mask):
    x = h[mask.bool()]
    xc = x - x.mean(0)
    c = xc.T @ xc / (x.shape[0] - 1)
    return float((c.square().sum() - torch.diagonal(c).square().sum()) / x.shape[1])


# ----------------------------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("mask_policy", ["attention", "labels"])
def test_drift_matches_a_hand_computation(mask_policy):
    model = tiny_model().train()  # no dropout in the tiny model: train mode gives the same activations
    directions = dirs()
    monitor = DriftMonitor(directions, mask=mask_policy).attach(model)
    calib, step_a, step_b = batch(0), batch(1), batch(2)
    model(**calib)
    assert monitor.update() is None and monitor.calibrated  # the first step calibrates
    model(**step_a)
    model(**step_b)  # two micro-batches in one step: the mean is over both steps' tokens
    reading = monitor.update()

    key = "labels" if mask_policy == "labels" else "attention_mask"
    def sel(b):
        return b[key] != (-100 if key == "labels" else 0)
    for layer in (1, 2):
        u = directions[layer].double()
        base = hidden(model, calib, layer)[sel(calib)] @ u.T  # (N, k) coordinates
        mu, sd = base.mean(0), base.std(0, unbiased=False)
        now = torch.cat([hidden(model, b, layer)[sel(b)] for b in (step_a, step_b)]) @ u.T
        want = (now.mean(0) - mu) / sd
        # float32 forward in both paths; the projections accumulate in float64 → agreement to ~1e-5 relative.
        assert reading.drift[layer] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-5)
        assert monitor.base_mean[layer] == pytest.approx(mu.tolist(), rel=1e-5, abs=1e-6)
        assert monitor.base_std[layer] == pytest.approx(sd.tolist(), rel=1e-5)
        # Covariance penalty: mean over the step's micro-batches, relative to the calibration value.
        base_cov = ref_cov(hidden(model, calib, layer), sel(calib))
        step_cov = (ref_cov(hidden(model, step_a, layer), sel(step_a)) +
                    ref_cov(hidden(model, step_b, layer), sel(step_b))) / 2
        assert reading.cov_change[layer] == pytest.approx((step_cov - base_cov) / base_cov, rel=1e-4)
    metrics = monitor.metrics()
    assert metrics["drift/layer_2/dir_1"] == reading.drift[2][1]
    assert metrics["max_drift"] == pytest.approx(max(abs(v) for vs in reading.drift.values() for v in vs))
    harmful = monitor.metrics(side="harmful")["max_drift"]
    assert harmful == pytest.approx(max([0.0] + [v for vs in reading.drift.values() for v in vs]))


def test_identical_step_has_zero_drift_and_calibration_set_matches_first_batches():
    model = tiny_model().train()
    monitor = DriftMonitor(dirs()).attach(model)
    b = batch(3)
    model(**b)
    monitor.update()
    model(**b)
    reading = monitor.update()
    assert all(abs(v) < 1e-6 for vs in reading.drift.values() for v in vs)
    assert all(abs(c) < 1e-6 for c in reading.cov_change.values())
    other = DriftMonitor(dirs())
    other.attach(model)
    other.calibrate(model, [b])  # eval mode, no grad: same numbers for a dropout-free model
    for layer in monitor.base_mean:
        assert other.base_mean[layer] == pytest.approx(monitor.base_mean[layer], rel=1e-6, abs=1e-7)
        assert other.base_std[layer] == pytest.approx(monitor.base_std[layer], rel=1e-6)
    assert model.training, "calibrate restores the model's mode"


def test_observe_by_hand_equals_hooks():
    model = tiny_model().train()
    hooked = DriftMonitor(dirs()).attach(model)
    manual = DriftMonitor(dirs(), layers=[1])
    for seed in (0, 1):
        b = batch(seed)
        out = model(**b, output_hidden_states=True)
        # hidden_states[ℓ + 1] is layer ℓ's output except for the last layer (after the final norm): layer 1 only.
        manual.observe({1: out.hidden_states[2]}, b["attention_mask"].bool())
        hooked.update()
        manual.update()
    assert manual.layers == [1]
    assert manual.last.drift[1] == pytest.approx(hooked.last.drift[1], rel=1e-6, abs=1e-7)


def test_only_training_forwards_count():
    model = tiny_model().train()
    monitor = DriftMonitor(dirs()).attach(model)
    model(**batch(0))
    monitor.update()
    with torch.no_grad():
        model(**batch(5))  # no grad (DPO reference pass)
    model.eval()
    model(**batch(6))  # evaluation
    model.train()
    assert monitor.update() is None, "nothing counted since the last update"
    # Activation checkpointing re-runs layers inside backward: counted once.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = batch(1)
    model(**b).loss.backward()
    with_ckpt = monitor.update()
    model.gradient_checkpointing_disable()
    model(**b)
    without = monitor.update()
    assert with_ckpt.n_tokens == without.n_tokens == int(b["attention_mask"].sum())
    for layer in (1, 2):
        assert with_ckpt.drift[layer] == pytest.approx(without.drift[layer], rel=1e-5, abs=1e-6)


def test_paired_reference_forward_is_not_counted():
    # The paired anchor runs the stack with the adapter disabled from the LM's pre-hook; the monitor must see only
    # the adapted forward, whichever hooks were registered first.
    base = tiny_model()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj", "down_proj"], lora_dropout=0.0,
                                            init_lora_weights=False))
    model.train()
    for monitor_first in (True, False):
        monitor = DriftMonitor(dirs())
        reg = OrthoRegularizer(OrthoRegConfig(layers=[1, 2], anchor="paired"), dirs(), mode="return")
        first, second = (monitor, reg) if monitor_first else (reg, monitor)
        first.attach(model)
        second.attach(model)
        b = batch(0)
        model(**b)
        monitor.update()
        with model.disable_adapter():
            model(**b)  # the base model: this is what a reference pass looks like
        base_reading = monitor.update()
        model(**b)
        adapted = monitor.update()
        assert all(abs(v) < 1e-6 for vs in adapted.drift.values() for v in vs), "calibrated on the adapted forward"
        assert any(abs(v) > 1e-3 for vs in base_reading.drift.values() for v in vs)
        monitor.detach()
        reg.detach()


# ----------------------------------------------------------------------------------------------- Trainer


def make_trainer(model, callbacks, tmp_path, steps=4, **overrides):
    return harness_trainer(model, callbacks, tmp_path, steps=steps, **overrides)


def test_metrics_are_logged_from_the_first_reading(tmp_path):
    recorder = LogRecorder()
    fw = FirewallCallback(FirewallConfig(max_drift=100.0), dirs())
    make_trainer(tiny_model(), [recorder, fw], tmp_path, steps=3).train()
    assert "firewall/max_drift" not in recorder.seen[0], "step 1 calibrates"
    logged = recorder.seen[1]
    for key in ("firewall/drift/layer_1/dir_0", "firewall/drift/layer_2/dir_1", "firewall/max_drift",
                "firewall/cov_change/layer_1", "firewall/alerts"):
        assert key in logged, key
    assert logged["firewall/alerts"] == 0.0
    assert "firewall/proj_weight" not in logged


def test_warn_logs_one_line_per_crossing(tmp_path, caplog):
    fw = FirewallCallback(FirewallConfig(max_drift=1e-4, action="warn", layers=[2]), dirs())
    with caplog.at_level(logging.WARNING, logger="orthoreg.firewall.callback"):
        make_trainer(tiny_model(), [fw], tmp_path, steps=4, learning_rate=1e-2).train()
    lines = [r.getMessage() for r in caplog.records if "orthoreg firewall" in r.getMessage()]
    # Two directions of layer 2 cross once each (they stay above the tiny threshold afterwards): two lines.
    assert len(lines) == 2, lines
    assert all("layer 2" in line and "harmful direction" in line and "exceeds max_drift" in line for line in lines)
    assert sorted(line.split("harmful direction ")[1][0] for line in lines) == ["0", "1"]


def test_stop_ends_training_and_keeps_a_checkpoint(tmp_path):
    fw = FirewallCallback(FirewallConfig(max_drift=1e-4, action="stop", patience=2), dirs())
    trainer = make_trainer(tiny_model(), [fw], tmp_path, steps=10, learning_rate=1e-2)
    trainer.train()
    # Step 1 calibrates; steps 2 and 3 are over the threshold: patience 2 stops at step 3.
    assert trainer.state.global_step == 3 and fw.firewall.stopped_at == 3
    saved = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["orthoreg_firewall"]["stopped_at"] == 3
    assert saved["log_history"][-1]["firewall/max_drift"] > 1e-4


def test_no_stop_under_the_threshold(tmp_path):
    fw = FirewallCallback(FirewallConfig(max_drift=1e3, action="stop"), dirs())
    trainer = make_trainer(tiny_model(), [fw], tmp_path, steps=4)
    trainer.train()
    assert trainer.state.global_step == 4 and fw.firewall.stopped_at is None
    assert not (tmp_path / "checkpoint-4").exists() and not any(tmp_path.glob("checkpoint-*"))


def test_budget_mode_adapts_the_regularizer_weight(tmp_path):
    recorder = LogRecorder()
    config = OrthoRegConfig(layers=[1, 2], proj_weight=1.0, anchor="base_mean")
    callbacks = budget_callbacks(config, dirs(), FirewallConfig(max_drift=1e-3, action="adapt"))
    seen = []

    class WeightProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(callbacks[0].regularizer.config.proj_weight)

    make_trainer(tiny_model(), [recorder, *callbacks, WeightProbe()], tmp_path, steps=5, learning_rate=1e-2).train()
    # Calibration step at λ_min (start="min": 1e-4 · the configured 1.0), then the drift (≫ the 1e-3 budget)
    # raises it every step.
    assert seen[0] == seen[1] == pytest.approx(1e-4)
    assert all(b > a for a, b in zip(seen[1:], seen[2:], strict=False))
    history = callbacks[1].firewall.history
    assert [h["proj_weight"] for h in history[:-1]] == seen[2:]
    logged = [r["firewall/proj_weight"] for r in recorder.seen if "firewall/proj_weight" in r]
    assert logged == [h["proj_weight"] for h in history]


def test_adapt_needs_a_regularizer():
    with pytest.raises(ValueError, match="pass `target=`"):
        FirewallCallback(FirewallConfig(max_drift=1.0, action="adapt"), dirs())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_drift=0.0), "`max_drift`"),
        (dict(max_drift=1.0, action="explode"), "`action`"),
        (dict(max_drift=1.0, side="left"), "`side`"),
        (dict(max_drift=1.0, patience=0), "`patience`"),
        (dict(max_drift=1.0, probe=[]), "`probe`"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FirewallConfig(**kwargs)


def test_probe_mode_measures_a_fixed_set(tmp_path):
    probe = [{k: v for k, v in batch(9).items() if k != "labels"}]
    fw = FirewallCallback(FirewallConfig(max_drift=100.0, probe=probe), dirs())
    model = tiny_model()
    trainer = make_trainer(model, [fw], tmp_path, steps=2)
    trainer.train()
    # Calibrated on the probe at train begin (the base model): every step has a reading; the last one equals a
    # fresh measurement of the trained model on the probe.
    assert [h["step"] for h in fw.firewall.history] == [1, 2]
    check = DriftMonitor(dirs())
    check.load_state_dict(fw.firewall.monitor.state_dict())
    check.observe_batches(model, probe)
    reading = check.update()
    for layer in (1, 2):
        assert reading.drift[layer] == pytest.approx(fw.firewall.monitor.last.drift[layer], rel=1e-6)


# ----------------------------------------------------------------------------------------------- resume


def test_resume_restores_calibration_and_controller_without_recomputing(tmp_path):
    config = OrthoRegConfig(layers=[1, 2], proj_weight=1.0, anchor="base_mean")
    firewall = FirewallConfig(max_drift=1e-3, action="adapt")
    first = budget_callbacks(config, dirs(), firewall)
    make_trainer(tiny_model(), first, tmp_path, steps=3, save_strategy="steps", save_steps=2,
                 learning_rate=1e-2).train()
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    stored = saved["orthoreg_firewall"]
    assert stored["monitor"]["base_mean"] is not None and stored["controller"]["updates"] == 1

    resumed = budget_callbacks(copy.deepcopy(config), dirs(), firewall)
    weights = []

    class WeightProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            weights.append(resumed[0].regularizer.config.proj_weight)

    monitor = resumed[1].firewall.monitor
    with patch.object(DriftMonitor, "_finish_calibration", autospec=True,
                      side_effect=AssertionError("recalibrated on resume")) as recalibrate:
        make_trainer(tiny_model(seed=1), [*resumed, WeightProbe()], tmp_path, steps=3).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert recalibrate.call_count == 0
    # The base statistics are the checkpoint's, bit for bit (the resumed model is a different one).
    assert {str(k): v for k, v in monitor.base_mean.items()} == stored["monitor"]["base_mean"]
    assert {str(k): v for k, v in monitor.base_std.items()} == stored["monitor"]["base_std"]
    # The controller continues: the weight at step 3 is the one saved after step 2.
    assert weights == [pytest.approx(math.exp(stored["controller"]["log_weight"]))]
    assert resumed[1].firewall.controller.updates == 2


def test_resume_without_firewall_state_is_refused(tmp_path):
    make_trainer(tiny_model(), [], tmp_path, steps=2, save_strategy="steps", save_steps=1).train()
    fw = FirewallCallback(FirewallConfig(max_drift=1.0), dirs())
    with pytest.raises(ValueError, match="no firewall state"):
        make_trainer(tiny_model(), [fw], tmp_path, steps=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ----------------------------------------------------------------------------------------------- without a Trainer


def test_plain_firewall_in_a_custom_loop():
    model = tiny_model().train()
    config = OrthoRegConfig(layers=[1, 2], proj_weight=1.0)
    firewall = Firewall(FirewallConfig(max_drift=1e-4, action="stop"), dirs(), target=config)
    firewall.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events = []
    for seed in range(4):
        model(**batch(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        events.append(firewall.update())
        if events[-1].stop:
            break
    assert events[0].reading is None and events[1].stop and len(events) == 2
    assert firewall.metrics()["alerts"] >= 1
    state = json.loads(json.dumps(firewall.state_dict()))  # JSON-serialisable
    again = Firewall(FirewallConfig(max_drift=1e-4, action="stop"), dirs(), target=config)
    again.load_state_dict(state)
    assert again.monitor.base_mean == firewall.monitor.base_mean and again.stopped_at == firewall.stopped_at


def test_budget_mode_drives_ortholora_in_a_custom_loop():
    # Without a Trainer: the firewall adapts OrthoLoRA's proj_weight (the paired anchor), and the next forward's
    # outputs.loss carries exactly the new weight; the adapter-disabled reference forward is not observed.
    from orthoreg.lora.wrapper import OrthoLoRA

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                                                         init_lora_weights=False))
    config = OrthoRegConfig(layers=[1, 2], proj_weight=1.0, anchor="paired")
    model = OrthoLoRA(peft_model, config, dirs())
    firewall = Firewall(FirewallConfig(max_drift=1e-3, action="adapt"), dirs(), target=config)
    firewall.attach(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    weights = []
    for seed in range(4):
        out = model(**batch(seed))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        event = firewall.update()
        weights.append(config.proj_weight)
        if event.reading is not None:
            assert event.weight == config.proj_weight
    assert firewall.monitor.calibrated and len(firewall.history) == 3
    assert all(h["drift"] > 1e-3 for h in firewall.history), "the LoRA update must drift past this tiny budget"
    assert weights[-1] > weights[1] > 0, f"over budget, the weight must rise: {weights}"
    # The weight in force is the one the loss uses.
    out = model(**batch(9))
    penalty = float(out.orthoreg_penalty.detach())
    assert float(out.loss) == pytest.approx(float(out.task_loss) + penalty, abs=2e-6)  # float32 at |loss| ≈ 5
    assert penalty > 0
    config.proj_weight = 2 * weights[-1]
    doubled = model(**batch(9))
    assert float(doubled.orthoreg_penalty.detach()) == pytest.approx(2 * penalty, rel=1e-4)
    # One observation per training forward: the paired reference forward (adapter disabled) is not counted.
    assert firewall.monitor.calibration_tokens == int(batch(0)["attention_mask"].sum())
