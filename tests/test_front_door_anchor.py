"""The anchor KL behind the front door: ``OrthoRegConfig(anchor_kl_weight=…)`` in ``OrthoRegCallback``, and
``recommended()``'s default (the built-in harmless requests, λ 0.3).

References are float64 math written in ``tests.anchor_reference`` from the term's definition: greedy replies of the
base (adapter off), its log-probabilities, and λ∇AKL of the seeded first anchor batch by autograd. The front door
must add exactly that to the task's gradient — beside the reader term (counted once) and under activation
checkpointing (whose recompute runs inside the anchor's backward).
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from orthoreg import OrthoRegCallback, OrthoRegConfig
from orthoreg.anchor import AnchorKLError, sharded_backend
from orthoreg.config import RECOMMENDED_ANCHOR_KL_WEIGHT
from orthoreg.core.prompts import load_builtin
from orthoreg.reader.subspaces import InputSubspaces
from tests.anchor_reference import ANCHORS, float64_anchor_grads, peft_pair
from tests.models import tiny_model, tiny_tokenizer
from tests.trainer_harness import LogRecorder, assert_grads_close, chat_rows, make_trainer, train_one_step

torch.set_num_threads(1)


def _anchor_config(**overrides):
    settings = dict(proj_weight=0.0, anchor_kl_weight=0.7, anchor_kl_tokens=3, anchor_kl_batch_size=4)
    settings.update(overrides)
    return OrthoRegConfig(**settings)


def _data(tok):
    return Dataset.from_dict(chat_rows(tok, [f"w{i} w{i + 1}" for i in range(70, 78)], reply="w5 w6 w7", width=12))


def _reader_spaces(model):
    g = torch.Generator().manual_seed(7)
    return InputSubspaces({n: torch.randn(2, m.in_features, generator=g)
                           for n, m in model.get_base_model().named_modules()
                           if n.endswith(("q_proj", "up_proj")) and hasattr(m, "lora_A")})


def test_recommended_runs_the_harmless_anchor_kl():
    config = OrthoRegConfig.recommended()
    assert config.anchor_kl_weight == RECOMMENDED_ANCHOR_KL_WEIGHT == 0.3
    assert (config.anchor_kl_prompts, config.anchor_kl_tokens, config.anchor_kl_batch_size) == ("harmless", 4, 8)
    callback = OrthoRegCallback(config)
    assert callback.anchor_kl.prompts == load_builtin("train").harmless
    assert OrthoRegCallback(OrthoRegConfig.recommended(anchor_kl_weight=0)).anchor_kl is None
    assert OrthoRegConfig.from_dict(config.to_dict()) == config  # JSON round trip of the new fields
    OrthoRegConfig(proj_weight=0.0, anchor_kl_weight=0.1)  # the anchor KL alone is a regulariser


def test_the_front_door_adds_lambda_times_the_float64_anchor_gradient():
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    want = float64_anchor_grads(model, tok, 0.7, num_tokens=3, batch_size=4, seed=0)  # TrainingArguments.seed
    plain, _, _ = train_one_step(copy.deepcopy(model), _data(tok))
    callback = OrthoRegCallback(_anchor_config(), anchors=ANCHORS, tokenizer=tok)
    both, _, _ = train_one_step(copy.deepcopy(model), _data(tok), callbacks=[callback])
    assert any(g.abs().max() > 1e-4 for g in want.values())
    assert_grads_close({n: both[n] - plain[n] for n in want}, want, rel=1e-4)


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
def test_beside_the_reader_term_each_enters_once(tmp_path, checkpointing):
    """Reader and anchor in one callback: (both − reader alone) is the anchor's float64 gradient, with and without
    activation checkpointing (a recompute inside the anchor's backward must not inject the reader term again)."""
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    spaces = _reader_spaces(model)
    want = float64_anchor_grads(model, tok, 0.7, num_tokens=3, batch_size=4, seed=0)

    def fresh():
        copied = copy.deepcopy(model)
        if checkpointing == "reentrant":  # frozen embeddings: reentrant checkpointing needs grad-requiring inputs
            copied.enable_input_require_grads()
        return copied

    reader = OrthoRegCallback(OrthoRegConfig(proj_weight=0.0, reader_weight=1e-3), input_subspaces=spaces)
    alone, _, _ = train_one_step(fresh(), _data(tok), callbacks=[reader], checkpointing=checkpointing,
                                 output_dir=str(tmp_path / "a"))
    both_callback = OrthoRegCallback(_anchor_config(reader_weight=1e-3), input_subspaces=spaces, anchors=ANCHORS,
                                     tokenizer=tok)
    both, _, _ = train_one_step(fresh(), _data(tok), callbacks=[both_callback], checkpointing=checkpointing,
                                output_dir=str(tmp_path / "b"))
    plain, _, _ = train_one_step(fresh(), _data(tok), checkpointing=checkpointing, output_dir=str(tmp_path / "c"))
    size = sum((alone[n] - plain[n]).norm() for n in want) / sum(want[n].norm() for n in want)
    assert 0.1 < size < 10  # the reader term's gradient is comparable: counted twice, it would show
    assert_grads_close({n: both[n] - alone[n] for n in want}, want, rel=1e-4)


def test_the_logs_carry_the_anchor_kl_and_its_share_of_the_total(tmp_path):
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    recorder = LogRecorder()
    callback = OrthoRegCallback(_anchor_config(anchor_kl_weight=2.0), anchors=ANCHORS, tokenizer=tok)
    make_trainer(model, [recorder, callback], tmp_path, steps=2).train()
    logged = [logs for logs in recorder.seen if "orthoreg/anchor_kl" in logs]
    assert len(logged) == 2 and logged[0]["orthoreg/anchor_kl"] > 0  # the adapter is non-zero from the start
    assert logged[0]["orthoreg/total"] == pytest.approx(2.0 * logged[0]["orthoreg/anchor_kl"])


def test_a_full_fine_tune_records_its_own_weights_before_the_first_update(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model()
    base64 = copy.deepcopy(model).double().eval()
    callback = OrthoRegCallback(_anchor_config(), anchors=ANCHORS, tokenizer=tok)
    make_trainer(model, [callback], tmp_path, steps=1).train()
    term = callback.anchor_kl
    for i, sequence in enumerate(term.sequences):
        start = term.reply_starts[i]
        with torch.no_grad():
            logits = base64(input_ids=torch.tensor([sequence])).logits[0, start - 1:len(sequence) - 1]
        torch.testing.assert_close(term.base_log_probs[i].double(), torch.log_softmax(logits, -1), atol=1e-5,
                                   rtol=1e-5)


def test_what_the_anchor_kl_cannot_serve_is_refused_by_name(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    args = SimpleNamespace(fp16=False, deepspeed=None, fsdp="", seed=0)
    state = SimpleNamespace(global_step=0)
    callback = OrthoRegCallback(_anchor_config(), anchors=ANCHORS)
    with pytest.raises(AnchorKLError, match="processing_class"):
        callback._record_anchor_base(args, state, model, None)
    for sharded, backend in ((dict(deepspeed="ds_config.json"), "DeepSpeed"), (dict(fsdp="full_shard"), "FSDP")):
        with pytest.raises(AnchorKLError, match=f"under {backend}.*anchor_kl_weight=0"):
            callback._record_anchor_base(SimpleNamespace(**{**vars(args), **sharded}), state, model, tok)
    monkeypatch.setitem(os.environ, "ACCELERATE_USE_FSDP", "true")  # an accelerate launch says so in the environment
    assert sharded_backend(args, model) == "FSDP"
    monkeypatch.delitem(os.environ, "ACCELERATE_USE_FSDP")
    assert sharded_backend(args, model) is None
    with pytest.raises(AnchorKLError, match="resuming a full fine-tune at step 3"):
        callback._record_anchor_base(args, SimpleNamespace(global_step=3), tiny_model(), tok)
    with pytest.raises(ValueError, match="OrthoRegCallback does not support fp16"):
        make_trainer(copy.deepcopy(model), [OrthoRegCallback(_anchor_config(), anchors=ANCHORS, tokenizer=tok)],
                     tmp_path, steps=1, fp16=True, use_cpu=True).train()


@pytest.mark.parametrize("bad, message", [
    (dict(anchor_kl_weight=-0.1), "anchor_kl_weight"),
    (dict(anchor_kl_weight=float("nan")), "anchor_kl_weight"),
    (dict(anchor_kl_prompts="helpful"), "anchor_kl_prompts"),
    (dict(anchor_kl_tokens=0), "anchor_kl_tokens"),
    (dict(anchor_kl_batch_size=True), "anchor_kl_batch_size"),
])
def test_bad_anchor_settings_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        OrthoRegConfig.recommended(**bad)


def test_a_missing_anchor_file_is_refused_when_the_callback_is_built(tmp_path):
    config = OrthoRegConfig.recommended(anchor_kl_prompts=str(tmp_path / "anchors.json"))
    with pytest.raises(AnchorKLError, match="does not exist"):
        OrthoRegCallback(config)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_through_ortholora_the_anchor_kl_enters_the_loss(tmp_path, checkpointing):
    """OrthoLoRA adds λ·AKL of each training forward's anchor batch to ``outputs.loss``: its gradient is the float64
    one, with activation checkpointing too (the anchor forward runs without it, so no unmarked recompute)."""
    import json

    from orthoreg import OrthoLoRA

    tok = tiny_tokenizer()
    model, _ = peft_pair()
    want = float64_anchor_grads(model, tok, 0.7, num_tokens=3, batch_size=4, seed=0)
    batch = {k: torch.tensor(v[:4]) for k, v in _data(tok).to_dict().items()}
    anchors = tmp_path / "anchors.json"
    anchors.write_text(json.dumps(ANCHORS))

    def grads(wrap):
        copy_ = copy.deepcopy(model)
        if checkpointing:
            copy_.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net = wrap(copy_)
        net.train()
        net(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in copy_.named_parameters() if p.grad is not None}, net

    plain, _ = grads(lambda m: m)
    both, ortho = grads(lambda m: OrthoLoRA(m, _anchor_config(anchor_kl_prompts=str(anchors)), tokenizer=tok))
    assert_grads_close({n: both[n] - plain[n] for n in want}, want, rel=1e-4)
    metrics = ortho.pop_metrics()
    assert metrics["orthoreg/anchor_kl"] > 0
    assert metrics["orthoreg/total"] == pytest.approx(0.7 * metrics["orthoreg/anchor_kl"], rel=1e-5)
    with pytest.raises(AnchorKLError, match="tokenizer"):
        OrthoLoRA(copy.deepcopy(model), _anchor_config(anchor_kl_prompts=str(anchors)))
