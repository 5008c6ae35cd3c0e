"""OrthoRegCallback's gradients equal those of ``task + λ·penalty`` inside a real Trainer step.

For every case: g_callback == g_task (the same Trainer step without the callback) + ∇ Σ_mb (λ/GA)·penalty_mb, the
latter computed in float64 by ``trainer_harness.reference_penalty_grads`` on the batches the Trainer saw, to 1e-5
relative per parameter tensor (float32 forward/backward of a 3-layer model: observed errors are ~1e-7).
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from orthoreg import HarmfulDirections, OrthoRegCallback, OrthoRegConfig
from tests.models import tiny_model
from tests.trainer_harness import (
    assert_grads_close,
    padded_dataset,
    reference_penalty_grads,
    train_one_step,
)

CHECKPOINTING = [None, "reentrant", "non_reentrant"]


def directions_for(layers, d=32, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(k, d, generator=g) for i in layers})


def check_callback_gradients(model, config, directions, ga, checkpointing, tmp_path, mask_policy="attention",
                             micro_batches=None):
    """``micro_batches`` < ``ga``: the epoch holds only that many micro-batches, so the one optimizer step is an
    uneven last step (the Trainer normalises the task loss over those micro-batches, the penalty must follow)."""
    micro_batches = micro_batches or ga
    dataset = padded_dataset(n=4 * micro_batches)
    initial = copy.deepcopy(model)
    plain_grads, plain_batches, _ = train_one_step(
        copy.deepcopy(model), dataset, ga=ga, checkpointing=checkpointing, output_dir=str(tmp_path / "plain"))
    callback = OrthoRegCallback(config, directions)
    got, batches, trainer = train_one_step(
        model, dataset, callbacks=[callback], ga=ga, checkpointing=checkpointing, output_dir=str(tmp_path / "reg"))
    assert len(batches) == micro_batches
    for a, b in zip(plain_batches, batches, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    penalty = reference_penalty_grads(initial, batches, config, directions, micro_batches, mask_policy=mask_policy)
    want = {name: plain_grads[name] + penalty.get(name, 0) for name in plain_grads}
    # The test must be able to fail: the penalty's gradient is a sizeable part of the total.
    ratio = sum(p.norm() for p in penalty.values()) / sum(g.norm() for g in plain_grads.values())
    assert ratio > 0.05, f"penalty gradient too small to test against ({ratio:.3g})"
    assert_grads_close(got, want)
    logged = trainer.state.log_history[0]
    assert logged["orthoreg/total"] > 0
    return logged


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
@pytest.mark.parametrize("ga", [1, 2])
def test_full_finetune_gradients(family, checkpointing, ga, tmp_path):
    model = tiny_model(family)
    directions = directions_for([1, 2])
    config = OrthoRegConfig(layers=[1, 2], cov_weight=3e4, proj_weight=20.0, anchor="base_mean")
    logged = check_callback_gradients(model, config, directions, ga, checkpointing, tmp_path)
    assert logged["orthoreg/cov"] > 0 and "orthoreg/proj" in logged


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
@pytest.mark.parametrize("ga", [1, 2])
def test_lora_paired_anchor_gradients(checkpointing, ga, tmp_path):
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj", "q_proj"], init_lora_weights=False),
    )
    if checkpointing == "reentrant":
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input to reach LoRA
    config = OrthoRegConfig(layers=[0, 2], cov_weight=3e4, proj_weight=2e3, anchor="paired")
    check_callback_gradients(model, config, directions_for([0, 2]), ga, checkpointing, tmp_path)


@pytest.mark.parametrize("anchor", ["absolute", "base_mean"])
def test_label_mask_policy_and_anchor(anchor, tmp_path):
    config = OrthoRegConfig(layers="last_half", cov_weight=3e4, proj_weight=20.0, anchor=anchor, mask="labels")
    check_callback_gradients(tiny_model("llama"), config, directions_for([1, 2]), 2, None, tmp_path,
                             mask_policy="labels")


def test_prompt_end_mask_policy(tmp_path):
    # One token per row (the last prompt token): the reference selects position 1 from the data layout itself.
    config = OrthoRegConfig(layers="last_half", cov_weight=3e4, proj_weight=20.0, anchor="base_mean",
                            mask="prompt_end")
    check_callback_gradients(tiny_model("llama"), config, directions_for([1, 2]), 2, None, tmp_path,
                             mask_policy="prompt_end")


def test_uneven_last_accumulation_step_scales_the_penalty_like_the_task(tmp_path):
    # GA = 3 over an epoch of 2 micro-batches: the step's penalty is the mean over those 2, not Σ/3.
    config = OrthoRegConfig(layers=[1, 2], cov_weight=3e4, proj_weight=20.0, anchor="base_mean")
    check_callback_gradients(tiny_model("llama"), config, directions_for([1, 2]), 3, None, tmp_path, micro_batches=2)
