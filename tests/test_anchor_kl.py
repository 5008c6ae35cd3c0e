"""The anchor KL (``orthoreg.anchor``, on its own through ``baselines.AnchorKLCallback``): the recorded base replies,
the term's gradient, its errors.

The float64 reference is written here: a float64 copy of the base (no adapter) decodes greedily and gives the base's
log-probabilities; a float64 copy of the PEFT model gives π_θ; AKL = mean over the anchors' reply positions of
Σ_v p (log p − log p_base), differentiated by autograd in float64.
"""

from __future__ import annotations

import copy
import json
import random
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from orthoreg.baselines import AnchorKLCallback, AnchorKLError
from orthoreg.terms.reply_kl import reply_kl
from tests.anchor_reference import ANCHORS, float64_anchor_grads, hand_greedy, peft_pair
from tests.models import tiny_tokenizer
from tests.trainer_harness import LogRecorder, assert_grads_close, chat_rows, make_trainer, train_one_step

torch.set_num_threads(1)


def test_the_base_replies_and_log_probs_are_the_adapter_off_model_s():
    tok = tiny_tokenizer()
    model, base64 = peft_pair()
    callback = AnchorKLCallback(1.0, ANCHORS, tokenizer=tok, num_tokens=3).term
    callback.record_base(model, tok)
    for i, prompt in enumerate(ANCHORS):
        ids = tok(prompt + " ", add_special_tokens=False)["input_ids"]
        reply = hand_greedy(base64, ids, 3, tok.eos_token_id)
        assert callback.sequences[i] == ids + reply
        assert callback.reply_starts[i] == len(ids)
        logits = base64(input_ids=torch.tensor([ids + reply])).logits[0, len(ids) - 1:len(ids) + len(reply) - 1]
        torch.testing.assert_close(callback.base_log_probs[i].double(), torch.log_softmax(logits, -1),
                                   atol=1e-5, rtol=1e-5)
    # the adapter is on again afterwards, and it changes the logits: the record was not of the adapted model
    ids = torch.tensor([callback.sequences[0]])
    with torch.no_grad():
        on = model(input_ids=ids).logits.double()
    assert (on - base64(input_ids=ids).logits).abs().max() > 1e-3


def test_the_kl_is_zero_at_the_base_and_matches_float64_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64)
    base = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(logits, -1)
    want = (p * (torch.log(p) - base)).sum(-1).mean()
    torch.testing.assert_close(reply_kl(logits, base).double(), want, atol=1e-6, rtol=1e-6)
    assert float(reply_kl(base, base)) == pytest.approx(0.0, abs=1e-6)
    # bf16 logits: the math runs in float32 (a bf16 softmax would be off by ~1e-3)
    torch.testing.assert_close(reply_kl(logits.bfloat16(), base).double(),
                               (lambda q: (q * (torch.log(q) - base)).sum(-1).mean())(
                                   torch.softmax(logits.bfloat16().double(), -1)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="vocabulary"):
        reply_kl(logits, base[:, :10])
    with pytest.raises(ValueError, match="no positions"):
        reply_kl(logits[:0], base[:0])


def test_the_added_gradient_is_lambda_times_the_float64_kl_gradient():
    tok = tiny_tokenizer()
    data = Dataset.from_dict(chat_rows(tok, [f"w{i} w{i + 1}" for i in range(70, 78)], reply="w5 w6 w7", width=12))
    model, _ = peft_pair()
    want = float64_anchor_grads(model, tok, 0.7, num_tokens=3, batch_size=4, seed=3)
    plain, _, _ = train_one_step(copy.deepcopy(model), data)
    callback = AnchorKLCallback(0.7, ANCHORS, tokenizer=tok, num_tokens=3, batch_size=4, seed=3)
    both, _, _ = train_one_step(copy.deepcopy(model), data, callbacks=[callback])
    added = {n: both[n] - plain[n] for n in want}
    assert any(g.abs().max() > 1e-4 for g in want.values())
    assert_grads_close(added, want, rel=1e-4)


def test_beside_the_reader_term_the_anchor_forward_adds_only_its_own_gradient(tmp_path):
    """The anchor batch is a forward of the model in training mode with grad on; marked, it must not make the reader
    penalty (injected once per training forward) enter twice per step."""
    from orthoreg import OrthoRegCallback, OrthoRegConfig
    from orthoreg.reader.subspaces import InputSubspaces

    tok = tiny_tokenizer()
    data = Dataset.from_dict(chat_rows(tok, [f"w{i} w{i + 1}" for i in range(70, 78)], reply="w5 w6 w7", width=12))
    model, _ = peft_pair()
    g = torch.Generator().manual_seed(7)
    spaces = InputSubspaces({n: torch.randn(2, m.in_features, generator=g)
                             for n, m in model.get_base_model().named_modules()
                             if n.endswith(("q_proj", "up_proj")) and hasattr(m, "lora_A")})

    def reader():
        # λ chosen so that the reader's gradient is the anchor's size: counted twice, it would show far above 1e-4
        return OrthoRegCallback(OrthoRegConfig(proj_weight=0.0, reader_weight=1e-3), input_subspaces=spaces)

    want = float64_anchor_grads(model, tok, 0.7, num_tokens=3, batch_size=4, seed=3)
    alone, _, _ = train_one_step(copy.deepcopy(model), data, callbacks=[reader()], output_dir=str(tmp_path / "a"))
    anchor = AnchorKLCallback(0.7, ANCHORS, tokenizer=tok, num_tokens=3, batch_size=4, seed=3)
    both, _, _ = train_one_step(copy.deepcopy(model), data, callbacks=[reader(), anchor], output_dir=str(tmp_path / "b"))
    plain, _, _ = train_one_step(copy.deepcopy(model), data, output_dir=str(tmp_path / "c"))
    size = sum((alone[n] - plain[n]).norm() for n in want) / sum(want[n].norm() for n in want)
    assert 0.1 < size < 10  # the reader term's gradient is comparable to the anchor's
    assert_grads_close({n: both[n] - alone[n] for n in want}, want, rel=1e-4)


def test_through_ortholora_the_writer_term_stays_out_of_the_anchor_gradient():
    from orthoreg import OrthoRegConfig
    from orthoreg.lora.wrapper import OrthoLoRA
    from tests.models import random_directions

    tok = tiny_tokenizer()
    model, _ = peft_pair()
    want = float64_anchor_grads(model, tok, 0.7, num_tokens=3, batch_size=4, seed=3)
    ortho = OrthoLoRA(model, OrthoRegConfig(layers="all", proj_weight=0.0, lora_weight=3.0),
                      random_directions(layers=(0, 1)))
    ortho.train()
    term = AnchorKLCallback(0.7, ANCHORS, tokenizer=tok, num_tokens=3, batch_size=4, seed=3).term
    term.record_base(ortho, tok, seed=3)
    (0.7 * term.loss(ortho, term.batch_for(0))).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_close(got, want, rel=1e-4)


def test_the_anchor_cycle_covers_every_anchor_in_a_seeded_order():
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    term = AnchorKLCallback(1.0, ANCHORS, tokenizer=tok, num_tokens=1, batch_size=4).term
    term.record_base(model, tok, seed=5)
    first, second = term.batch_for(0), term.batch_for(1)
    assert len(first) == 4 and len(second) == 4
    assert set(first) | set(second[:2]) == set(range(len(ANCHORS)))  # 6 anchors: the cycle wraps after 6
    order = list(range(len(ANCHORS)))
    random.Random("anchor-kl-5").shuffle(order)
    assert first == order[:4] and second == order[4:] + order[:2]
    # two data-parallel ranks: step t of rank r starts at (2t + r)·4, so the ranks never share a step's anchors
    assert term.batch_for(0, rank=1, world_size=2) == second
    assert term.batch_for(1, rank=0, world_size=2) == [order[(8 + i) % 6] for i in range(4)]


def test_training_logs_the_kl_ahead_of_the_reporters(tmp_path):
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    recorder = LogRecorder()
    callback = AnchorKLCallback(2.0, ANCHORS, tokenizer=tok, num_tokens=2, batch_size=2)
    trainer = make_trainer(model, [recorder, callback], tmp_path, steps=2)
    trainer.train()
    logged = [logs for logs in recorder.seen if "anchor_kl/kl" in logs]
    assert logged and logged[0]["anchor_kl/total"] == pytest.approx(2.0 * logged[0]["anchor_kl/kl"])
    assert logged[0]["anchor_kl/kl"] > 0  # the adapter is non-zero from the start


def test_bad_input_is_refused_by_name():
    for weight in (0.0, -1.0, float("nan"), True):
        with pytest.raises(AnchorKLError, match="weight"):
            AnchorKLCallback(weight, ANCHORS)
    with pytest.raises(AnchorKLError, match="no anchor prompts"):
        AnchorKLCallback(1.0, [])
    with pytest.raises(AnchorKLError, match="#1"):
        AnchorKLCallback(1.0, ["w10", "  "])
    with pytest.raises(AnchorKLError, match="num_tokens"):
        AnchorKLCallback(1.0, ANCHORS, num_tokens=0)
    model, _ = peft_pair()
    with pytest.raises(AnchorKLError, match="chat template"):
        AnchorKLCallback(1.0, ANCHORS).term.record_base(model, tiny_tokenizer(chat_template=False))
    with pytest.raises(AnchorKLError, match="not recorded"):
        AnchorKLCallback(1.0, ANCHORS).on_step_begin(None, SimpleNamespace(global_step=0), None, model=model)
    with pytest.raises(AnchorKLError, match="does not exist"):
        AnchorKLCallback(1.0, "missing/anchors.json")


def test_the_default_anchors_are_the_builtin_harmful_training_requests():
    from orthoreg.core.prompts import load_builtin

    callback = AnchorKLCallback(1.0)
    assert callback.prompts == load_builtin("train").harmful
    assert not set(callback.prompts) & set(load_builtin("test").harmful)
    assert AnchorKLCallback(1.0, "harmful").prompts == callback.prompts
    harmless = AnchorKLCallback(1.0, "harmless").prompts
    assert harmless == load_builtin("train").harmless and not set(harmless) & set(callback.prompts)


def test_one_string_is_not_taken_for_a_list_of_anchors():
    # iterating a string would anchor single characters: refused by name instead
    with pytest.raises(AnchorKLError, match="pass a list of anchor requests"):
        AnchorKLCallback(1.0, "How do I bake bread?")


def test_anchors_from_a_json_file_and_bad_files_refused_by_name(tmp_path):
    path = tmp_path / "anchors.json"
    path.write_text(json.dumps(ANCHORS))
    assert AnchorKLCallback(1.0, str(path)).prompts == ANCHORS
    for name, text, message in (("object.json", '{"a": 1}', "not a list"), ("broken.json", "[1,", "not valid JSON"),
                                ("numbers.json", "[1, 2]", "#0")):
        (tmp_path / name).write_text(text)
        with pytest.raises(AnchorKLError, match=message):
            AnchorKLCallback(1.0, str(tmp_path / name))
