"""The anchor KL (``orthoreg.baselines.anchor_kl``): the recorded base replies, the term's gradient, its errors.

The float64 reference is written here: a float64 copy of the base (no adapter) decodes greedily and gives the base's
log-probabilities; a float64 copy of the PEFT model gives π_θ; AKL = mean over the anchors' reply positions of
Σ_v p (log p − log p_base), differentiated by autograd in float64.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from orthoreg.baselines import AnchorKLCallback, AnchorKLError, anchor_kl
from tests.models import tiny_model, tiny_tokenizer
from tests.trainer_harness import LogRecorder, assert_grads_close, chat_rows, make_trainer, train_one_step

torch.set_num_threads(1)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
ANCHORS = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33", "w40 w41 w42", "w50", "w60 w61 w62 w63 w64"]


def peft_pair(seed: int = 0):
    """(a PEFT model whose adapter is switched on and non-zero, a float64 copy of its base without adapter)."""
    base = tiny_model(seed=seed)
    base64 = copy.deepcopy(base).double().eval()
    model = get_peft_model(base, LoraConfig(**LORA))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, base64


def hand_greedy(base64, ids: list[int], n: int, eos: int) -> list[int]:
    reply = []
    for _ in range(n):
        token = int(base64(input_ids=torch.tensor([ids + reply])).logits[0, -1].argmax())
        reply.append(token)
        if token == eos:
            break
    return reply


def test_the_base_replies_and_log_probs_are_the_adapter_off_model_s():
    tok = tiny_tokenizer()
    model, base64 = peft_pair()
    callback = AnchorKLCallback(1.0, ANCHORS, tokenizer=tok, num_tokens=3)
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
    torch.testing.assert_close(anchor_kl(logits, base).double(), want, atol=1e-6, rtol=1e-6)
    assert float(anchor_kl(base, base)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(AnchorKLError, match="vocabulary"):
        anchor_kl(logits, base[:, :10])


def float64_anchor_grads(model, tok, weight: float, num_tokens: int, batch_size: int, seed: int):
    """λ·∇AKL of the first anchor batch on a float64 copy, derived here from the docstring's definition."""
    model64 = copy.deepcopy(model).double()
    with model64.disable_adapter(), torch.no_grad():
        replies, base = [], []
        for prompt in ANCHORS:
            ids = tok(prompt + " ", add_special_tokens=False)["input_ids"]
            reply = hand_greedy(model64, ids, num_tokens, tok.eos_token_id)
            logits = model64(input_ids=torch.tensor([ids + reply])).logits[0]
            replies.append((ids, reply))
            base.append(torch.log_softmax(logits[len(ids) - 1:len(ids) + len(reply) - 1], -1))
    order = list(range(len(ANCHORS)))
    random.Random(f"anchor-kl-{seed}").shuffle(order)
    terms = []
    for i in order[:batch_size]:
        ids, reply = replies[i]
        logits = model64(input_ids=torch.tensor([ids + reply])).logits[0, len(ids) - 1:len(ids) + len(reply) - 1]
        log_p = torch.log_softmax(logits, -1)
        terms.append((log_p.exp() * (log_p - base[i])).sum(-1))
    (weight * torch.cat(terms).mean()).backward()
    return {n: p.grad.float() for n, p in model64.named_parameters() if p.grad is not None}


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
    callback = AnchorKLCallback(0.7, ANCHORS, tokenizer=tok, num_tokens=3, batch_size=4, seed=3)
    callback.record_base(ortho, tok)
    (0.7 * callback.loss(ortho, callback.next_batch(), tok.pad_token_id)).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_close(got, want, rel=1e-4)


def test_the_anchor_cycle_covers_every_anchor_in_a_seeded_order():
    tok = tiny_tokenizer()
    model, _ = peft_pair()
    callback = AnchorKLCallback(1.0, ANCHORS, tokenizer=tok, num_tokens=1, batch_size=4, seed=5)
    callback.record_base(model, tok)
    first, second = callback.next_batch(), callback.next_batch()
    assert len(first) == 4 and len(second) == 4
    assert set(first) | set(second[:2]) == set(range(len(ANCHORS)))  # 6 anchors: the cycle wraps after 6
    order = list(range(len(ANCHORS)))
    random.Random("anchor-kl-5").shuffle(order)
    assert first == order[:4]


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
    tok = tiny_tokenizer()
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
        AnchorKLCallback(1.0, ANCHORS).record_base(model, tiny_tokenizer(chat_template=False))
    with pytest.raises(AnchorKLError, match="disable_adapter"):
        AnchorKLCallback(1.0, ANCHORS).record_base(tiny_model(), tok)
    with pytest.raises(AnchorKLError, match="train start"):
        AnchorKLCallback(1.0, ANCHORS).on_step_begin(None, None, None, model=model)


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
