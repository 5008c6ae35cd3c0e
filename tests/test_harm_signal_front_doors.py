"""The harm signal behind both front doors: ``OrthoRegConfig(harm_signal_every=N)`` makes ``OrthoRegCallback`` and
``OrthoLoRA`` log the refusal margins every N updates. The reference is an independent probe recorded on a copy of
the untouched base and measured on the trained model."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from orthoreg import OrthoLoRA, OrthoRegCallback, OrthoRegConfig
from orthoreg.config import RECOMMENDED_HARM_SIGNAL_EVERY
from orthoreg.core.prompts import load_builtin
from orthoreg.engine.metrics import HARM_SIGNAL_METRICS, METRIC_PREFIX
from orthoreg.firewall import MarginGuardCallback, MarginGuardConfig, RefusalMarginProbe
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama
from tests.trainer_harness import chat_rows

torch.set_num_threads(1)
KEYS = [METRIC_PREFIX + name for name in HARM_SIGNAL_METRICS]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def _rows(tokenizer, n=8):
    return chat_rows(tokenizer, load_builtin("train").harmful[:n])


def _independent_probe(model, tokenizer):
    probe = RefusalMarginProbe()
    probe.record_base(copy.deepcopy(model), tokenizer)
    return probe


def test_recommended_logs_the_signal_every_ten_steps():
    assert OrthoRegConfig.recommended().harm_signal_every == RECOMMENDED_HARM_SIGNAL_EVERY == 10
    assert OrthoRegConfig(proj_weight=1.0).harm_signal_every is None
    assert OrthoRegConfig.recommended(harm_signal_every=0).harm_signal_every is None  # a command line's "off"
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="harm_signal_every"):
            OrthoRegConfig.recommended(harm_signal_every=bad)


def test_callback_logs_the_margins_of_the_trained_model(tokenizer, tmp_path):
    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    reference = _independent_probe(model, tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             use_cpu=True, report_to=[], save_strategy="no", seed=0, learning_rate=1e-2)
    callback = OrthoRegCallback(OrthoRegConfig.recommended(harm_signal_every=2))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(_rows(tokenizer)),
                      processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    logged = [row for row in trainer.state.log_history if KEYS[0] in row]
    assert [row["step"] for row in logged] == [2, 4] and all(set(KEYS) <= set(row) for row in logged)
    assert "orthoreg/reader" in logged[-1]  # one log row carries both the penalty and the signal
    want = reference.measure(model)
    assert {k: logged[-1][k] for k in KEYS} == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want[KEYS[1]] != 0.0  # the weights moved: a real reading, not the base's
    assert "orthoreg_harm_signal" in trainer.state.stateful_callbacks  # the base of step 0 goes with checkpoints


def test_a_tokenizer_without_chat_template_turns_the_signal_off_out_loud(tokenizer, tmp_path):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                             report_to=[], save_strategy="no")
    config = OrthoRegConfig(proj_weight=0.0, cov_weight=0.1, units="base", harm_signal_every=2)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(_rows(tokenizer)),
                      processing_class=plain, callbacks=[OrthoRegCallback(config)])
    with pytest.warns(UserWarning, match="harm signal .* is off for this run: the tokenizer has no chat template.*"
                                         "harm_signal_every=0"):
        trainer.train()  # the penalty trains on
    assert not any("orthoreg/harm_margin" in row for row in trainer.state.log_history)
    assert any("orthoreg/cov" in row for row in trainer.state.log_history)


def test_a_linked_guard_takes_over_the_reading():
    orthoreg = OrthoRegCallback(OrthoRegConfig.recommended())
    assert orthoreg.harm_signal is not None
    MarginGuardCallback(MarginGuardConfig(max_fall=1.0, action="adapt"), orthoreg=orthoreg)
    assert orthoreg.harm_signal is None  # one probe per run


def test_ortholora_reads_every_n_updates_and_pops_each_reading_once(tokenizer, tmp_path):
    peft_model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    reference = _independent_probe(peft_model, tokenizer)
    with pytest.warns(UserWarning, match="harm signal .* is off: .*pass OrthoLoRA\\(..., tokenizer=tokenizer\\)"):
        quiet = OrthoLoRA(peft_model, OrthoRegConfig(proj_weight=0.0, cov_weight=0.1, harm_signal_every=2))
    assert quiet.harm_signal is None  # the penalties still run; the diagnostic is off, said out loud
    quiet.remove_hooks()
    model = OrthoLoRA(peft_model, OrthoRegConfig.recommended(harm_signal_every=2, anchor_kl_weight=0), tokenizer=tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: torch.tensor(v[:4]) for k, v in _rows(tokenizer).items()}
    model.train()
    popped = []
    for _ in range(5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        popped.append(model.pop_metrics())
    # Readings after 2 and 4 updates, taken by the forwards of steps 3 and 5 before they change anything.
    assert [r["step"] for r in model.harm_readings] == [2, 4]
    assert [KEYS[0] in m for m in popped] == [False, False, True, False, True]
    final = model.read_harm_signal()
    assert final == pytest.approx(reference.measure(peft_model), rel=1e-5, abs=1e-6)
    assert model.pop_metrics()[KEYS[0]] == final[KEYS[0]]

    model.save_pretrained(tmp_path / "saved")
    restored = OrthoLoRA.from_pretrained(tiny_llama(tokenizer), tmp_path / "saved")  # no tokenizer needed
    assert restored.harm_signal.probe.base == model.harm_signal.probe.base  # the saved base of step 0, not re-recorded
    assert restored.read_harm_signal() == pytest.approx(final, rel=1e-5, abs=1e-6)
