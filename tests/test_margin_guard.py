"""The harm-margin guard (orthoreg.firewall.margin_guard): its control law against numbers worked by hand, its warn /
stop actions, that the λ it sets is the λ whose gradient reaches the weights, its state on resume, and its errors."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from orthoreg import OrthoRegCallback, OrthoRegConfig
from orthoreg.config import RECOMMENDED_READER_WEIGHT
from orthoreg.core.prompts import load_builtin
from orthoreg.firewall import (
    BudgetConfig,
    DriftBudgetController,
    HarmSignalError,
    MarginGuardCallback,
    MarginGuardConfig,
    RefusalMarginProbe,
)
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama
from tests.trainer_harness import chat_rows

torch.set_num_threads(1)
LAMBDA0 = RECOMMENDED_READER_WEIGHT
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def _guard(action="adapt", max_fall=1.0, **config):
    orthoreg = OrthoRegCallback(OrthoRegConfig.recommended())
    return MarginGuardCallback(MarginGuardConfig(max_fall=max_fall, action=action, **config), orthoreg=orthoreg), \
        orthoreg


def test_floor_hold_keeps_lambda_min_where_off_switches_it_off():
    hold = DriftBudgetController(1.0, BudgetConfig(start="initial", floor="hold", min_weight=2.0), initial_weight=2.0)
    off = DriftBudgetController(1.0, BudgetConfig(start="initial", floor="off", min_weight=2.0), initial_weight=2.0)
    for _ in range(3):
        hold.update(0.0)
        off.update(0.0)
    assert hold.weight == 2.0 and off.weight == 0.0


def test_adapt_follows_the_pi_law_worked_by_hand():
    guard, orthoreg = _guard(max_fall=1.0)
    # Defaults: k_i 0.5, k_p 0.4, set point B, Δ_max 1, e_max 2, floor λ₀ (hold), ceiling 100 λ₀.
    guard.act(2.0, step=5)  # e = log 2, no previous error: Δu = 0.5 log 2
    assert guard.weight == pytest.approx(LAMBDA0 * 2 ** 0.5, rel=1e-12)
    assert orthoreg.config.reader_weight == guard.weight
    guard.act(2.0, step=10)  # e = log 2 again: Δu = 0.5 log 2 + 0.4 · 0
    assert guard.weight == pytest.approx(LAMBDA0 * 2.0, rel=1e-12)
    guard.act(8.0, step=15)  # e = log 8: Δu = 0.5 log 8 + 0.4 (log 8 − log 2) = 1.5 log 2 + 0.8 log 2 > Δ_max = 1
    assert guard.weight == pytest.approx(LAMBDA0 * 2.0 * math.e, rel=1e-12)
    guard.act(-0.5, step=20)  # the margin rose: e = −e_max = −2; Δu = −1 − 0.4 (2 + log 8) < −1 → −1
    assert guard.weight == pytest.approx(LAMBDA0 * 2.0, rel=1e-12)
    for step in (25, 30, 35):
        guard.act(0.0, step=step)
    assert guard.weight == pytest.approx(LAMBDA0, rel=1e-12) == orthoreg.config.reader_weight  # floored at λ₀
    for step in range(40, 200, 5):
        guard.act(50.0, step=step)
    assert guard.weight == pytest.approx(100 * LAMBDA0, rel=1e-12)  # the ceiling
    assert [h["step"] for h in guard.history][:4] == [5, 10, 15, 20]


def test_warn_once_per_crossing_and_stop_after_patience(caplog):
    guard, _ = _guard(action="warn", max_fall=1.0)
    with caplog.at_level(logging.WARNING, logger="orthoreg.firewall.margin_guard"):
        stops = [guard.act(fall, step=i) for i, fall in enumerate([0.5, 1.5, 2.0, 0.2, 1.2])]
    assert stops == [False] * 5 and guard.weight is None
    assert len([r for r in caplog.records if "max_fall" in r.getMessage()]) == 2  # crossings at 1.5 and 1.2
    stopper, _ = _guard(action="stop", max_fall=1.0, patience=2)
    assert [stopper.act(f, step=i) for i, f in enumerate([1.5, 0.5, 1.5, 1.6, 1.7])] == \
        [False, False, False, True, True]
    assert stopper.stopped_at == 3


def test_the_weight_it_sets_is_the_weight_whose_gradient_reaches_the_adapter(tokenizer, tmp_path):
    """Task gradient + λ·∇reader: the gradients at 0, λ₀ and 2λ₀ on one batch lie on a line in λ (and move)."""
    model = get_peft_model(tiny_llama(tokenizer).double(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained-looking adapter: ΔW ≠ 0, so ∇reader ≠ 0
    orthoreg = OrthoRegCallback(OrthoRegConfig.recommended())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    orthoreg.on_train_begin(args, TrainerState(), TrainerControl(), model=model, processing_class=tokenizer)
    data = _dataset(tokenizer, n=4)
    batch = {k: torch.tensor(v) for k, v in data[:4].items()}
    model.train()  # the reader term acts only in training mode

    def grads(weight):
        orthoreg.set_weight("reader", weight)
        model.zero_grad()
        model(**batch).loss.backward()
        return torch.cat([p.grad.double().flatten() for n, p in model.named_parameters() if p.grad is not None])

    task, g1, g2 = grads(0.0), grads(LAMBDA0), grads(2 * LAMBDA0)
    orthoreg.detach()
    assert (g1 - task).norm() > 1e-3 * task.norm()
    # The term is computed in float32 whatever the model's dtype: agreement to float32 rounding of λ·∇reader.
    torch.testing.assert_close(g2 - g1, g1 - task, rtol=1e-5, atol=1e-5 * float((g1 - task).abs().max()))


def test_set_weight_refuses_a_term_that_is_not_wired_and_bad_values():
    orthoreg = OrthoRegCallback(OrthoRegConfig.recommended())
    with pytest.raises(ValueError, match="proj_weight=0"):
        orthoreg.set_weight("proj", 1.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        orthoreg.set_weight("reader", float("nan"))
    with pytest.raises(ValueError, match="'reader', 'proj' or 'cov'"):
        orthoreg.set_weight("lora", 1.0)


def _dataset(tokenizer, n=8):
    # harmful requests answered with a compliance opener
    return Dataset.from_dict(chat_rows(tokenizer, load_builtin("train").harmful[:n]))


def test_budget_mode_in_a_trainer_logs_and_applies_the_law(tokenizer, tmp_path):
    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    orthoreg = OrthoRegCallback(OrthoRegConfig.recommended())
    guard = MarginGuardCallback(MarginGuardConfig(max_fall=1e-3, action="adapt"), orthoreg=orthoreg,
                                every_n_steps=1, probe=RefusalMarginProbe(pairs=4))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             use_cpu=True, report_to=[], save_strategy="no", seed=0, learning_rate=2e-2)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(tokenizer), processing_class=tokenizer,
                      callbacks=[orthoreg, guard])
    trainer.train()
    logged = [row for row in trainer.state.log_history if "orthoreg/guard_weight" in row]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    falls = [row["orthoreg/harm_fall"] for row in logged]
    assert all(row["orthoreg/harm_fall"] == -row["orthoreg/harm_margin_delta"] for row in logged)
    assert max(falls) > 1e-3  # trained to open harmful requests with "Sure": the margin fell at least once
    # The law replayed by hand from the logged falls (set point 1e-3, k_i 0.5, k_p 0.4, Δ_max 1, e_max 2).
    u, prev, want = math.log(LAMBDA0), None, []
    for fall in falls:
        e = -2.0 if fall <= 0 else max(-2.0, min(2.0, math.log(fall / 1e-3)))
        u += max(-1.0, min(1.0, 0.5 * e + 0.4 * (e - (e if prev is None else prev))))
        u = min(max(u, math.log(LAMBDA0)), math.log(100 * LAMBDA0))
        prev = e
        want.append(math.exp(u))
    assert [row["orthoreg/guard_weight"] for row in logged] == pytest.approx(want, rel=1e-9)
    assert max(want) > 1.5 * LAMBDA0  # the law did raise λ, so the checks below see a changed weight
    assert orthoreg.reader.weight == orthoreg.config.reader_weight == pytest.approx(want[-1], rel=1e-12)
    # The step after a raise carries the raised λ: orthoreg/total = λ in force · reader + λ_anchor · anchor KL.
    for before, row in zip(logged, logged[1:], strict=False):
        assert row["orthoreg/total"] == pytest.approx(before["orthoreg/guard_weight"] * row["orthoreg/reader"]
                                                      + 0.3 * row["orthoreg/anchor_kl"], rel=1e-5)
    state = trainer.state.stateful_callbacks["orthoreg_margin_guard"]
    assert json.loads(json.dumps(state))["controller"]["updates"] == 4


def test_state_round_trips_and_resume_with_another_action_is_refused():
    guard, _ = _guard(max_fall=1.0)
    for step, fall in ((5, 2.0), (10, 3.0)):
        guard.act(fall, step)
    resumed, orthoreg = _guard(max_fall=1.0)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    resumed._apply_weight()
    assert resumed.weight == guard.weight and orthoreg.config.reader_weight == guard.weight
    assert resumed.act(2.5, 15) == guard.act(2.5, 15) and resumed.weight == guard.weight
    warner, _ = _guard(action="warn")
    with pytest.raises(HarmSignalError, match="another action"):
        warner.load_state_dict(guard.state_dict())
    with pytest.raises(ValueError, match="drift budget is 1.0"):
        other, _ = _guard(max_fall=2.0)
        other.load_state_dict(guard.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    ({"max_fall": 0.0}, "max_fall"), ({"max_fall": float("nan")}, "max_fall"), ({"max_fall": True}, "max_fall"),
    ({"max_fall": 1.0, "action": "adapt_later"}, "action"), ({"max_fall": 1.0, "term": "lora"}, "term"),
    ({"max_fall": 1.0, "patience": 0}, "patience"), ({"max_fall": 1.0, "max_factor": 1.0}, "max_factor"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(HarmSignalError, match=match):
        MarginGuardConfig(**kwargs)


def test_adapt_needs_a_wired_orthoreg_term():
    with pytest.raises(HarmSignalError, match="orthoreg=<the OrthoRegCallback"):
        MarginGuardCallback(MarginGuardConfig(max_fall=1.0, action="adapt"))
    with pytest.raises(HarmSignalError, match="proj_weight=0"):
        MarginGuardCallback(MarginGuardConfig(max_fall=1.0, action="adapt", term="proj"),
                            orthoreg=OrthoRegCallback(OrthoRegConfig.recommended()))
