"""TReFT (``orthoreg.baselines.treft``): template positions, the K/V drift term and its gradient.

The float64 reference recomputes every layer's keys and values by hand from ``output_hidden_states``:
k = k_proj(input_layernorm(h_ℓ)), v = v_proj(input_layernorm(h_ℓ)) on a float64 copy of the model, adapter on and
off, and ℒ_KV = mean_ℓ mean_(b,t) (‖Δk‖²/‖k₀‖² + ‖Δv‖²/‖v₀‖²) at positions counted from how the batch was built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from orthoreg.baselines.treft import TReFTCallback, TReFTRegularizer, template_positions, template_token_ids
from tests import test_chat_templates as chat_templates
from tests.models import tiny_model, tiny_tokenizer
from tests.trainer_harness import assert_grads_close, train_one_step

torch.set_num_threads(1)

# prefix "w3 w4 w5" (system block + user header), postfix "w6 w7" (assistant header), end of reply "w8"
TEMPLATE = ("w3 w4 {% for m in messages %}{% if m['role'] == 'user' %}w5 {{ m['content'] }} w6 w7 "
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }} w8 {% endif %}{% endfor %}")
PREFIX, POSTFIX = [3, 4, 5], [6, 7]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


def tokenizer():
    tok = tiny_tokenizer(chat_template=False)
    tok.chat_template = TEMPLATE
    return tok


def words(g, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(10, 99, (n,), generator=g))


def chat_batch(n=4, width=16, seed=0):
    """Right-padded single-turn chats, labels on the reply; also the user-content lengths."""
    tok, g = tokenizer(), torch.Generator().manual_seed(seed)
    rows, lengths = {"input_ids": [], "attention_mask": [], "labels": []}, []
    for _ in range(n):
        nu, nr = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        text = tok.apply_chat_template([{"role": "user", "content": words(g, nu)},
                                        {"role": "assistant", "content": words(g, nr)}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompt = len(PREFIX) + nu + len(POSTFIX)
        rows["input_ids"].append(ids + [0] * (width - len(ids)))
        rows["attention_mask"].append([1] * len(ids) + [0] * (width - len(ids)))
        rows["labels"].append([-100] * prompt + ids[prompt:] + [-100] * (width - len(ids)))
        lengths.append(nu)
    return {k: torch.tensor(v) for k, v in rows.items()}, lengths


def hand_positions(lengths, which, width=16):
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, nu in enumerate(lengths):
        spans = {"prefix": (0, 3), "query": (3, 3 + nu), "postfix": (3 + nu, 5 + nu), "prompt": (0, 5 + nu)}
        mask[b, slice(*spans[which])] = True
    return mask


def peft_model(perturb=True, seed=1):
    model = get_peft_model(tiny_model("llama"), LoraConfig(**LORA))
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.train()


def reference_term(model, batch, mask):
    """ℒ_KV in float64, by hand (differentiable in the model's parameters)."""
    model = model.double() if next(model.parameters()).dtype != torch.float64 else model
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)

    def kv(hidden):
        layers = model.get_base_model().model.layers
        return [(ly.self_attn.k_proj(ly.input_layernorm(h)), ly.self_attn.v_proj(ly.input_layernorm(h)))
                for ly, h in zip(layers, hidden, strict=False)]

    current = kv(model(**kwargs).hidden_states)
    with torch.no_grad(), model.disable_adapter():
        initial = kv(model(**kwargs).hidden_states)
    terms = []
    for pairs, pairs0 in zip(current, initial, strict=True):
        for x, x0 in zip(pairs, pairs0, strict=True):
            x, x0 = x[mask], x0[mask]
            terms.append(((x - x0).norm(dim=-1) ** 2 / x0.norm(dim=-1) ** 2).mean())
    return torch.stack(terms).sum() / len(current)


# ----------------------------------------------------------------------------------------------- positions
def test_template_ids_and_positions_are_the_headers():
    assert template_token_ids(tokenizer()) == {"prefix": PREFIX, "postfix": POSTFIX}
    batch, lengths = chat_batch()
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for which in ("postfix", "prefix", "query", "prompt"):
        got = template_positions(ids, which, PREFIX, POSTFIX, attn, labels)
        assert torch.equal(got, hand_positions(lengths, which)), which
    reg = TReFTRegularizer(1.0, positions="query", tokenizer=tokenizer())  # ids from the tokenizer's template
    assert reg.ids == {"prefix": PREFIX, "postfix": POSTFIX}
    # two turns: both assistant headers; padding never matches
    chat = [{"role": r, "content": c} for r, c in (("user", "w10"), ("assistant", "w11"), ("user", "w12 w13"),
                                                   ("assistant", "w14"))]
    text = tokenizer().apply_chat_template(chat, tokenize=False)
    two = torch.tensor([tokenizer()(text, add_special_tokens=False)["input_ids"] + [6, 7]])
    attn2 = torch.ones_like(two)
    attn2[0, -2:] = 0
    assert template_positions(two, "postfix", PREFIX, POSTFIX, attn2).nonzero()[:, 1].tolist() == [4, 5, 11, 12]


@pytest.mark.parametrize("family", [f.name for f in chat_templates.FAMILIES])
def test_template_ids_are_found_in_each_familys_chats(family):
    """The shipped templates of 12 families with BPE tokenizers trained in code (``tests/test_chat_templates``)."""
    tok = chat_templates.tokenizer(family)
    ids = template_token_ids(tok)
    for prompt in chat_templates.PROMPTS[:2]:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": chat_templates.REPLY}]
        row = torch.tensor([tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]])
        found = {w: template_positions(row, w, ids["prefix"], ids["postfix"]).nonzero()[:, 1].tolist()
                 for w in ("prefix", "query", "postfix")}
        assert found["prefix"] == list(range(found["prefix"][0], found["prefix"][0] + len(ids["prefix"])))
        assert len(found["postfix"]) == len(ids["postfix"]) and found["query"]
        assert found["prefix"][-1] + 1 == found["query"][0] and found["query"][-1] + 1 == found["postfix"][0]


# ----------------------------------------------------------------------------------------------- value
@pytest.mark.parametrize("which", ["postfix", "prefix", "query", "prompt"])
def test_zero_at_the_initial_model(which):
    batch, _ = chat_batch()
    model = peft_model(perturb=False)
    exact = TReFTRegularizer(1.0, which, prefix_ids=PREFIX, postfix_ids=POSTFIX, truncate_reference=False)
    exact.attach(model)
    model(**batch)
    assert exact.last_kv.item() == 0.0
    exact.detach()
    cut = TReFTRegularizer(1.0, which, prefix_ids=PREFIX, postfix_ids=POSTFIX).attach(model)
    model(**batch)
    assert cut.last_kv.item() < 1e-12  # the reference forward on the cut batch: float rounding only


@pytest.mark.parametrize("which", ["postfix", "prefix", "query", "prompt"])
def test_value_matches_float64_reference(which):
    batch, lengths = chat_batch()
    model = peft_model()
    want = reference_term(copy.deepcopy(model), batch, hand_positions(lengths, which))
    reg = TReFTRegularizer(3.0, which, prefix_ids=PREFIX, postfix_ids=POSTFIX).attach(model)
    model(**batch)
    assert want > 1e-3
    assert reg.last_kv.item() == pytest.approx(want.item(), rel=1e-5)
    metrics = reg.pop_metrics()
    assert metrics["total"] == pytest.approx(3.0 * metrics["kv"]) and metrics["positions"] > 0


# ----------------------------------------------------------------------------------------------- gradient
def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [None, True, False])  # None: off; else use_reentrant
def test_gradient_matches_float64_autograd(checkpointing):
    weight = 7.0
    batch, lengths = chat_batch()
    model = peft_model()
    ref = copy.deepcopy(model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    TReFTRegularizer(weight, "postfix", prefix_ids=PREFIX, postfix_ids=POSTFIX).attach(model)
    (model(**batch).logits * 0).sum().backward()  # no task gradient: only λ·∇ℒ_KV reaches the parameters
    (weight * reference_term(ref, batch, hand_positions(lengths, "postfix"))).backward()
    want, got = lora_grads(ref), lora_grads(model)
    assert all(got[n].abs().max() == 0 for n in set(got) - set(want))  # e.g. the last layer's MLP: no K/V above it
    assert_grads_close({n: got[n] for n in want}, want)
    assert want["base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight"].norm() > 1e-3


def test_trainer_step_adds_weight_over_ga_times_the_gradient(tmp_path):
    weight, ga = 5.0, 2
    batch, lengths = chat_batch(n=8)
    dataset = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    model = peft_model()
    initial = copy.deepcopy(model)
    plain, _, _ = train_one_step(copy.deepcopy(model), dataset, ga=ga, output_dir=str(tmp_path / "plain"))
    callback = TReFTCallback(weight, "postfix", tokenizer=tokenizer())
    got, batches, trainer = train_one_step(model, dataset, callbacks=[callback], ga=ga,
                                           output_dir=str(tmp_path / "cb"))
    for mb in batches:  # the assistant header: the two tokens before each row's first label
        first = (mb["labels"] != -100).int().argmax(1, keepdim=True)
        mask = (torch.arange(mb["labels"].shape[1]) < first) & (torch.arange(mb["labels"].shape[1]) >= first - 2)
        (weight / ga * reference_term(initial, mb, mask)).backward()
    penalty = lora_grads(initial)
    ratio = sum(p.norm() for p in penalty.values()) / sum(g.norm() for g in plain.values())
    assert ratio > 0.05, f"term gradient too small to test against ({ratio:.3g})"
    assert_grads_close(got, {n: plain[n] + penalty.get(n, torch.zeros(())).float() for n in plain})
    assert trainer.state.log_history[0]["treft/kv"] > 0


def test_threshold_stops_the_gradient_below_tau():
    batch, _ = chat_batch()
    model = peft_model()
    reg = TReFTRegularizer(1.0, "postfix", prefix_ids=PREFIX, postfix_ids=POSTFIX, threshold=1e6).attach(model)
    (model(**batch).logits * 0).sum().backward()
    assert all(g.abs().max() == 0 for g in lora_grads(model).values())
    assert reg.pop_metrics()["total"] == 0.0


def test_full_fine_tuning_uses_a_frozen_copy():
    batch, _ = chat_batch()
    model = tiny_model("llama").train()
    reg = TReFTRegularizer(1.0, "postfix", prefix_ids=PREFIX, postfix_ids=POSTFIX, reference_model=copy.deepcopy(model),
                           truncate_reference=False).attach(model)
    model(**batch)
    assert reg.last_kv.item() == 0.0
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(1.5)
    model(**batch)
    assert reg.last_kv.item() > 0


# ----------------------------------------------------------------------------------------------- errors
def test_bad_input_errors():
    batch, _ = chat_batch()
    model = peft_model()
    TReFTRegularizer(1.0, "postfix", prefix_ids=PREFIX, postfix_ids=[97, 98]).attach(model)
    with pytest.raises(ValueError, match="found no template positions"):
        model(**batch)
    gpt2 = get_peft_model(tiny_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="k_proj.*kv_names"):
        TReFTRegularizer(1.0, "postfix", postfix_ids=POSTFIX).attach(gpt2)
    with pytest.raises(ValueError, match="reference_model=copy.deepcopy"):
        TReFTRegularizer(1.0, "postfix", postfix_ids=POSTFIX).attach(tiny_model("llama"))
    with pytest.raises(ValueError, match="prefix token ids: pass tokenizer="):
        TReFTRegularizer(1.0)
    with pytest.raises(ValueError, match="positions"):
        TReFTRegularizer(1.0, positions="assistant", postfix_ids=POSTFIX)
    with pytest.raises(ValueError, match="layers"):
        TReFTRegularizer(1.0, "postfix", postfix_ids=POSTFIX, layers=[5]).attach(peft_model())
