"""The front door protects by default: ``OrthoRegCallback(OrthoRegConfig.recommended())`` with nothing else.

``recommended()`` is the template-reader constraint in base-model units with ``input_subspaces="builtin"``: at train
start the callback records V_m on the model before any update (LoRA adapter off) with the Trainer's
``processing_class``, saves them in ``output_dir`` and every checkpoint, and reads them back on resume. The references
here are independent: V_m recorded by hand with ``extract_template_subspaces`` on the untouched base model, the
logged term recomputed in float64 from the checkpoint's adapter tensors and the base weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import orthoreg.callback as callback_module
from orthoreg import InputSubspaces, OrthoLoRA, OrthoRegCallback, OrthoRegConfig, extract_template_subspaces
from orthoreg.config import RECOMMENDED_READER_WEIGHT
from orthoreg.core.prompts import load_builtin
from orthoreg.reader import InputSubspacesError
from orthoreg.reader.wiring import SUBSPACES_FOLDER
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama
from tests.trainer_harness import chat_rows

torch.set_num_threads(1)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def _lora(tokenizer, seed=0):
    return get_peft_model(tiny_llama(tokenizer, seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def _dataset(tokenizer, n=8):
    return Dataset.from_dict(chat_rows(tokenizer, load_builtin("test").harmless[:n]))


def _trainer(model, tokenizer, out, callbacks, steps=2, data_tokenizer=None, **overrides):
    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, logging_steps=1, use_cpu=True,
                report_to=[], save_strategy="steps", save_steps=1, seed=0, learning_rate=5e-3)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_dataset(data_tokenizer or tokenizer),
                   processing_class=tokenizer, callbacks=callbacks)


def _reader_logs(trainer):
    return [row["orthoreg/reader"] for row in trainer.state.log_history if "orthoreg/reader" in row]


def test_recommended_is_the_template_reader_constraint_in_base_units():
    config = OrthoRegConfig.recommended()
    assert (config.reader_weight, config.units, config.input_subspaces) == (RECOMMENDED_READER_WEIGHT, "base",
                                                                            "builtin")
    assert config.proj_weight == 0 and config.cov_weight == 0 and not config.needs_directions
    assert not config.base_statistics_needed  # no activation term, so nothing to calibrate
    projection = OrthoRegConfig.activation_projection(layers=[2, 5])
    assert (projection.proj_weight, projection.anchor, projection.units, projection.reader_weight) == (
        0.1, "base_mean", "base", 0.0)


def test_one_line_in_a_trainer_records_saves_and_logs_a_positive_reader(tokenizer, tmp_path):
    model = _lora(tokenizer)
    base = copy.deepcopy(model.get_base_model())  # the untouched base: the independent V and W₀
    trainer = _trainer(model, tokenizer, tmp_path / "run", [OrthoRegCallback(OrthoRegConfig.recommended())])
    trainer.train()
    logged = _reader_logs(trainer)
    assert len(logged) == 2 and logged[0] == 0.0 and logged[1] > 0  # ΔW = 0 before the first update, then > 0

    saved = InputSubspaces.from_pretrained(tmp_path / "run" / SUBSPACES_FOLDER)
    by_hand = extract_template_subspaces(base, tokenizer, load_builtin("train").harmless, k=16, targets=TARGETS)
    assert saved.names == [n for n in by_hand.names if not n.startswith("model.layers.0.")]
    for name in saved.names:  # the same subspace (projectors compared: the basis' signs are free)
        p_saved, p_hand = saved[name].double().T @ saved[name].double(), by_hand[name].double().T @ by_hand[name].double()
        assert torch.allclose(p_saved, p_hand, atol=1e-5), name
    in_checkpoint = InputSubspaces.from_pretrained(tmp_path / "run" / "checkpoint-1" / SUBSPACES_FOLDER)
    assert all(torch.equal(in_checkpoint[n], saved[n]) for n in saved.names)

    # The value logged at step 2 is mean_m s²‖B A V_mᵀ‖² / ‖W₀ V_mᵀ‖² at the adapter saved after step 1, in float64.
    adapter = load_file(str(tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors"))
    scaling = 8 / 4
    terms = []
    for name in saved.names:
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].double()
        v = saved[name].double()
        w0 = base.get_submodule(name).weight.double()
        terms.append((scaling * b @ a @ v.T).square().sum() / (w0 @ v.T).square().sum())
    assert logged[1] == pytest.approx(float(sum(terms) / len(terms)), rel=1e-4)


def test_a_resumed_run_reads_the_saved_subspaces_back(tokenizer, tmp_path, monkeypatch):
    model = _lora(tokenizer)
    _trainer(model, tokenizer, tmp_path / "run", [OrthoRegCallback(OrthoRegConfig.recommended())]).train()
    saved = InputSubspaces.from_pretrained(tmp_path / "run" / "checkpoint-1" / SUBSPACES_FOLDER)

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not record V_m again")

    monkeypatch.setattr(callback_module, "record_builtin_subspaces", refuse)
    resumed = OrthoRegCallback(OrthoRegConfig.recommended())
    trainer = _trainer(_lora(tokenizer), tokenizer, tmp_path / "run", [resumed], steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert all(torch.equal(resumed.input_subspaces[n], saved[n]) for n in saved.names)
    assert _reader_logs(trainer)[-1] > 0


def test_full_finetuning_records_every_trainable_module_and_refuses_a_resume_without_them(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    callback = OrthoRegCallback(OrthoRegConfig.recommended())
    trainer = _trainer(model, tokenizer, tmp_path / "full", [callback], steps=1)
    trainer.train()
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
                and not n.startswith("model.layers.0.")}
    assert set(callback.input_subspaces.names) == expected
    # Without the recorded V_m (neither in the checkpoint nor in output_dir) a full fine-tune cannot resume: the
    # resumed weights are not the base any more.
    for folder in (tmp_path / "full").glob("**/" + SUBSPACES_FOLDER):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    again = _trainer(tiny_llama(tokenizer), tokenizer, tmp_path / "full",
                     [OrthoRegCallback(OrthoRegConfig.recommended())], steps=2)
    with pytest.raises(ValueError, match="resuming a full fine-tune.*orthoreg_input_subspaces"):
        again.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))


def test_bad_input_is_named_with_its_fix(tokenizer, tmp_path):
    no_tokenizer = _trainer(_lora(tokenizer), tokenizer, tmp_path / "a", [OrthoRegCallback(
        OrthoRegConfig.recommended())])
    no_tokenizer.processing_class = None
    no_tokenizer.callback_handler.processing_class = None
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        no_tokenizer.train()
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(InputSubspacesError, match="no chat template"):
        _trainer(_lora(tokenizer), plain, tmp_path / "b", [OrthoRegCallback(OrthoRegConfig.recommended())],
                 data_tokenizer=tokenizer).train()
    with pytest.raises(FileNotFoundError, match="no input-subspaces file or folder"):
        OrthoRegCallback(OrthoRegConfig.recommended(input_subspaces=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="reader_k"):
        OrthoRegConfig.recommended(reader_k=0)


def test_a_saved_set_is_read_from_the_config(tokenizer, tmp_path):
    model = _lora(tokenizer)
    subspaces = extract_template_subspaces(model, tokenizer, load_builtin("train").harmless[:40], k=4, targets=["q_proj"])
    subspaces.save_pretrained(tmp_path / "v")
    callback = OrthoRegCallback(OrthoRegConfig.recommended(input_subspaces=str(tmp_path / "v")))
    assert callback.input_subspaces.names == subspaces.names and callback.reader is not None


def test_ortholora_records_the_builtin_subspaces_from_its_tokenizer(tokenizer, tmp_path):
    model = _lora(tokenizer)
    with pytest.raises(ValueError, match="tokenizer="):
        OrthoLoRA(model, OrthoRegConfig.recommended())
    wrapped = OrthoLoRA(model, OrthoRegConfig.recommended(), tokenizer=tokenizer)
    names = wrapped.input_subspaces.names
    assert names and all(n.rsplit(".", 1)[-1] in TARGETS and not n.startswith("model.layers.0.") for n in names)
    with torch.no_grad():  # an update: every B moves away from 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    wrapped.train()
    batch = {k: torch.tensor(v) for k, v in _dataset(tokenizer, 2)[:].items()}
    outputs = wrapped(**batch)
    assert float(outputs.orthoreg_penalty) > 0
    wrapped.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="anchor KL.*tokenizer=tokenizer"):  # it records the base's replies again
        OrthoLoRA.from_pretrained(_lora(tokenizer).get_base_model(), tmp_path / "saved")
    again = OrthoLoRA.from_pretrained(_lora(tokenizer).get_base_model(), tmp_path / "saved", tokenizer=tokenizer)
    assert again.input_subspaces.names == names
    card = json.loads((tmp_path / "saved" / "orthoreg_config.json").read_text())
    assert card["config"]["input_subspaces"] == "builtin"
    assert all(torch.equal(again.input_subspaces[n], wrapped.input_subspaces[n]) for n in names)
