"""Gradients and resumed runs against references that do not use orthoreg's own penalty functions.

- a DPO step: the callback's gradient = plain DPO's gradient + ∇ of the penalty written in float64 in the harness;
- bf16 weights: the injected gradient against float64 penalty math on the same bf16 forward;
- resume = uninterrupted: 2 steps + checkpoint + 2 steps equals 4 steps straight (callback and OrthoLoRA).
"""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from orthoreg import OrthoLoRA, OrthoRegCallback, OrthoRegConfig
from orthoreg.core.capture import layer_hidden
from tests.models import random_directions, tiny_model, tiny_tokenizer, word_text
from tests.trainer_harness import (
    assert_grads_close,
    make_trainer,
    padded_dataset,
    ref_covariance,
    ref_projection,
    reference_penalty_grads,
    train_one_step,
)


def dirs(layers=(1, 2), d=32, k=2, seed=0):
    return random_directions(layers, d, k, seed)


def test_dpo_step_gradient_equals_plain_dpo_plus_float64_penalty_gradient(tmp_path):
    from trl import DPOConfig, DPOTrainer

    tokenizer = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "prompt": [word_text(g, 3) for _ in range(4)],
        "chosen": [word_text(g, 4) for _ in range(4)],
        "rejected": [word_text(g, 2) for _ in range(4)],
    })
    base = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"],
                                                   init_lora_weights=False))
    config = OrthoRegConfig(layers=[1, 2], cov_weight=3.0, proj_weight=2.0, anchor="paired")
    directions = dirs()
    kwargs = dict(trainer_cls=DPOTrainer, args_cls=DPOConfig, batch_size=4,
                  extra_args=dict(bf16=False, max_length=16), trainer_kwargs=dict(processing_class=tokenizer))
    plain, _, _ = train_one_step(copy.deepcopy(base), data, output_dir=str(tmp_path / "plain"), **kwargs)
    model = copy.deepcopy(base)
    got, batches, _ = train_one_step(model, data, [OrthoRegCallback(config, directions)],
                                     output_dir=str(tmp_path / "reg"), **kwargs)
    assert len(batches) == 1  # chosen and rejected in one concatenated policy forward
    penalty = reference_penalty_grads(copy.deepcopy(base), batches, config, directions, ga=1)
    assert any(v.norm() > 0 for v in penalty.values())
    assert_grads_close(got, {n: plain[n] + penalty.get(n, 0) for n in plain}, rel=1e-5)


def test_bf16_model_injected_gradient_matches_float64_penalty_math():
    model = tiny_model().to(torch.bfloat16)
    model.train()
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    mask = batch["attention_mask"].bool()
    directions = dirs(layers=(1,))
    config = OrthoRegConfig(layers=[1], cov_weight=30.0, proj_weight=2.0, anchor="absolute")

    # The reference: the same bf16 forward, the penalty in float64 from the hand-written harness formulas.
    explicit = copy.deepcopy(model)
    captured = {}
    handle = explicit.model.layers[1].register_forward_hook(lambda m, a, o: captured.setdefault(1, layer_hidden(o)))
    out = explicit(**batch)
    handle.remove()
    u = directions[1].double()
    penalty = 30.0 * ref_covariance(captured[1], mask) + 2.0 * ref_projection(captured[1], u, mask)
    (out.loss.double() + penalty).backward()
    want = {n: p.grad.double() for n, p in explicit.named_parameters() if p.grad is not None}

    callback = OrthoRegCallback(config, directions)
    callback.regularizer.attach(model)
    model(**batch).loss.backward()
    callback.regularizer.check_step()
    got = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    # bf16 parameters: each gradient is stored with 8 bits of mantissa, so compare at bf16 resolution.
    assert_grads_close(got, want, rel=2e-2)
    # and the penalty's own part is really there: without it the gradients are far off
    plain = copy.deepcopy(explicit)
    plain.zero_grad()
    plain(**batch).loss.backward()
    off = max((plain_p.grad.double() - want[n]).norm().item() / want[n].norm().item()
              for n, plain_p in plain.named_parameters() if n in want)
    assert off > 0.05  # 4.5× the tolerance above


def trainer_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_callback_resume_equals_an_uninterrupted_run(tmp_path):
    config = OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=1.0, anchor="base_mean", warmup_steps=3)
    straight = make_trainer(tiny_model(), [OrthoRegCallback(config, dirs())], tmp_path / "straight", steps=4,
                            learning_rate=1e-2)
    straight.train()
    first = make_trainer(tiny_model(), [OrthoRegCallback(config, dirs())], tmp_path / "split", steps=4,
                         learning_rate=1e-2, save_strategy="steps", save_steps=2)
    first.train()
    resumed = make_trainer(tiny_model(seed=5), [OrthoRegCallback(config, dirs())], tmp_path / "split", steps=4,
                           learning_rate=1e-2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    a, b = trainer_weights(straight), trainer_weights(resumed)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= 1e-6, worst
    # not trivially equal: the penalty changed the run
    plain = make_trainer(tiny_model(), [], tmp_path / "plain", steps=4, learning_rate=1e-2)
    plain.train()
    assert max((a[n] - p).abs().max().item() for n, p in trainer_weights(plain).items()) > 1e-4


def ortholora_steps(ortho, batches, optimizer):
    for batch in batches:
        out = ortho(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_ortholora_resume_equals_an_uninterrupted_run(tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False)
    config = OrthoRegConfig(layers=[1, 2], proj_weight=1.0, lora_weight=0.5, anchor="base_mean", warmup_steps=3)
    data = padded_dataset(n=16)
    batches = [{k: torch.tensor(v) for k, v in data[i:i + 4].items()} for i in range(0, 16, 4)]

    def fresh():
        torch.manual_seed(0)
        ortho = OrthoLoRA(get_peft_model(tiny_model(), lora), config, dirs())
        ortho.train()
        return ortho

    def sgd(ortho):  # stateless, so the optimizer needs no checkpoint of its own
        return torch.optim.SGD([p for p in ortho.parameters() if p.requires_grad], lr=0.05)

    straight = fresh()
    ortholora_steps(straight, batches, sgd(straight))

    first = fresh()
    ortholora_steps(first, batches[:2], sgd(first))
    first.save_pretrained(tmp_path / "ckpt")
    resumed = OrthoLoRA.from_pretrained(tiny_model(), tmp_path / "ckpt")
    resumed.train()
    assert resumed.step == 2 and resumed.regularizer.base_reference.keys() == {1, 2}
    ortholora_steps(resumed, batches[2:], sgd(resumed))

    a = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    b = dict(resumed.model.named_parameters())
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= 1e-6, worst
