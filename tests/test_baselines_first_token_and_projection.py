"""First-token KL and the hard input-subspace projection (``orthoreg.baselines``), inside real Trainer steps.

First-token KL: g_callback == g_task (the same step without the callback) + ∇ Σ_mb (λ/GA)·FTKL_mb, FTKL computed here
in float64 from the model's logits with positions counted by hand (padded_dataset labels every token from position 2:
the first reply token is at 2, predicted by the logits at 1). Tolerance 1e-5 relative per parameter tensor.

Hard projection: after SGD steps A Vᵀ = 0 (1e-6) and A equals (A₀ − lr·g)(I − VᵀV) computed here in float64; the
adapted module's output on inputs in span(V) equals the base module's (adapter disabled).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from orthoreg.baselines import FirstTokenKLCallback, HardProjectionCallback, first_token_weights
from orthoreg.reader.subspaces import InputSubspaces, InputSubspacesError
from tests.models import tiny_model
from tests.trainer_harness import assert_grads_close, padded_dataset, train_one_step

torch.set_num_threads(1)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"], init_lora_weights=False)


def peft_model():
    return get_peft_model(tiny_model("llama"), LoraConfig(**LORA))


# ----------------------------------------------------------------------------------------------- first-token KL
def ftkl_reference(weights):
    def term(model, batch):
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
        with torch.no_grad(), model.disable_adapter():
            ref = model(input_ids=ids, attention_mask=attn).logits.double()
        total, sequences = 0, 0
        for b in range(ids.shape[0]):
            counted = False
            for j, w in enumerate(weights):  # reply token j + 1 sits at 2 + j, predicted by the logits at 1 + j
                t = 1 + j
                if t + 1 >= ids.shape[1] or labels[b, t + 1] == -100:
                    break
                log_p, log_q = logits[b, t].log_softmax(-1), ref[b, t].log_softmax(-1)
                total = total + w * (log_p.exp() * (log_p - log_q)).sum()
                counted = True
            sequences += counted
        return total / sequences

    return term


@pytest.mark.parametrize("ga", [1, 2])
def test_first_token_kl_gradients_against_float64(ga, tmp_path):
    weight = 20.0
    model = peft_model()
    initial = copy.deepcopy(model)
    dataset = padded_dataset(n=4 * ga)
    plain, _, _ = train_one_step(copy.deepcopy(model), dataset, ga=ga, output_dir=str(tmp_path / "plain"))
    callback = FirstTokenKLCallback(weight)
    got, batches, trainer = train_one_step(model, dataset, callbacks=[callback], ga=ga, output_dir=str(tmp_path / "cb"))
    ref_model = copy.deepcopy(initial)
    ref_model.train()
    term = ftkl_reference(first_token_weights())
    for batch in batches:
        (weight * term(ref_model, batch) / ga).backward()
    penalty = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    ratio = sum(p.norm() for p in penalty.values()) / sum(g.norm() for g in plain.values())
    assert ratio > 0.05, f"term gradient too small to test against ({ratio:.3g})"
    assert_grads_close(got, {n: plain[n] + penalty.get(n, 0) for n in plain})
    logged = trainer.state.log_history[0]
    assert logged["first_token_kl/kl"] > 0
    assert logged["first_token_kl/total"] == pytest.approx(weight * logged["first_token_kl/kl"])


def test_first_token_weights_decrease_from_the_first_token():
    w = first_token_weights(5, 5.0)
    assert w[0] == pytest.approx(5.0) and w[-1] == pytest.approx(1.0) and w == sorted(w, reverse=True)
    with pytest.raises(ValueError, match="num_tokens"):
        first_token_weights(0)


# ----------------------------------------------------------------------------------------------- hard projection
def subspaces_for(model, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = model.get_base_model()
    return InputSubspaces({n: torch.randn(k, m.in_features, generator=g) for n, m in base.named_modules()
                           if n.endswith(("q_proj", "up_proj", "down_proj")) and hasattr(m, "lora_A")})


def test_hard_projection_keeps_a_orthogonal_and_the_base_output_on_the_subspace(tmp_path):
    model = peft_model()
    subspaces = subspaces_for(model)
    lr = 1e-3  # the harness's learning rate
    callback = HardProjectionCallback(subspaces)
    before = {n: model.get_submodule(f"base_model.model.{n}").lora_A["default"].weight.detach().double().clone()
              for n in subspaces.names}
    assert max(float((a @ subspaces[n].double().T).abs().max()) for n, a in before.items()) > 1e-2  # test can fail
    grads, _, _ = train_one_step(model, padded_dataset(n=4), callbacks=[callback], ga=1, output_dir=str(tmp_path),
                                 extra_args={"optim": "sgd"})
    for name, v in subspaces.items():
        module = model.get_submodule(f"base_model.model.{name}")
        a = module.lora_A["default"].weight.detach().double()
        v = v.double()
        assert (a @ v.T).abs().max() < 1e-6, name
        projector = torch.eye(v.shape[1], dtype=torch.float64) - v.T @ v
        a0 = before[name] @ projector  # projected when training began; the gradient snapshot is of that step
        expected = (a0 - lr * grads[f"base_model.model.{name}.lora_A.default.weight"].double()) @ projector
        assert torch.allclose(a, expected, atol=1e-6), name
        x = torch.randn(5, 4, v.shape[0], dtype=torch.float64) @ v  # inputs inside span(V)
        with torch.no_grad():
            adapted = module(x.float())
            with model.disable_adapter():
                plain = module(x.float())
        assert torch.allclose(adapted, plain, atol=1e-5), name
        assert not torch.allclose(module.lora_B["default"].weight, torch.zeros(()))  # the adapter does act elsewhere


def test_hard_projection_refuses_modules_without_lora():
    model = peft_model()
    with pytest.raises(InputSubspacesError, match="no LoRA adapter"):
        HardProjectionCallback(InputSubspaces({"model.layers.0.self_attn.k_proj": torch.randn(2, 32)})).projection.attach(model)
