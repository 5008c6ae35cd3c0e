"""OrthoRegCallback inside Trainer / SFTTrainer / DPOTrainer: logging, resume, bad input."""

import copy
import json
import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from orthoreg import OrthoRegCallback, OrthoRegConfig
from orthoreg.core.capture import UnsupportedArchitectureError
from orthoreg.directions.harmful import DirectionsError
from orthoreg.engine.regularizer import NonFiniteHiddenStateError
from tests.models import random_directions, tiny_model, tiny_tokenizer, word_text
from tests.trainer_harness import (
    LogRecorder,
    assert_grads_close,
    make_trainer,
    padded_dataset,
    reference_penalty_grads,
    train_one_step,
)


def dirs(layers=(1, 2), d=32, k=1, seed=0):
    return random_directions(layers, d, k, seed)


def test_metrics_reach_reporters_registered_before_the_callback(tmp_path):
    recorder = LogRecorder()
    config = OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=1.0, per_layer_metrics=True)
    trainer = make_trainer(tiny_model(), [recorder, OrthoRegCallback(config, dirs())], tmp_path)
    trainer.train()
    first = recorder.seen[0]
    for key in ("loss", "orthoreg/cov", "orthoreg/proj", "orthoreg/total", "orthoreg/cov/layer_1",
                "orthoreg/proj/layer_2"):
        assert key in first, key
    assert first["orthoreg/cov"] == pytest.approx(first["orthoreg/cov/layer_1"] + first["orthoreg/cov/layer_2"])
    assert trainer.state.log_history[0]["orthoreg/proj"] == first["orthoreg/proj"]


def test_warmup_scales_the_injected_gradient(tmp_path):
    model = tiny_model()
    dataset = padded_dataset(n=4)
    plain, _, _ = train_one_step(copy.deepcopy(model), dataset, output_dir=str(tmp_path / "a"))
    config = OrthoRegConfig(layers=[1], cov_weight=3e4, proj_weight=0.0, warmup_steps=4)
    got, batches, _ = train_one_step(copy.deepcopy(model), dataset, callbacks=[OrthoRegCallback(config)],
                                     output_dir=str(tmp_path / "b"))
    full = reference_penalty_grads(model, batches, config, None, ga=1)
    want = {n: plain[n] + 0.25 * full.get(n, 0) for n in plain}  # step 0 of a 4-step warm-up: w = 1/4
    assert_grads_close(got, want)


def test_resume_restores_recorded_reference_and_schedule(tmp_path):
    config = OrthoRegConfig(layers=[1, 2], proj_weight=1.0, anchor="base_mean", warmup_steps=10)
    first = OrthoRegCallback(config, dirs())
    trainer = make_trainer(tiny_model(), [first], tmp_path, steps=3, save_strategy="steps", save_steps=2)
    trainer.train()
    recorded = {k: v.clone() for k, v in first.regularizer.base_reference.items()}
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert "orthoreg" in saved["stateful_callbacks"]

    resumed = OrthoRegCallback(config, dirs())
    seen_steps = []

    class StepProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen_steps.append(resumed.regularizer.step)

    trainer2 = make_trainer(tiny_model(seed=1), [resumed, StepProbe()], tmp_path, steps=3, save_strategy="no")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen_steps == [2]  # schedule continues at the checkpoint's step, not 0
    assert resumed.regularizer.base_reference.keys() == recorded.keys()
    for layer, r in recorded.items():  # restored bit-exactly, not recomputed on the (different) resumed model
        assert torch.equal(resumed.regularizer.base_reference[layer], r)


def test_resume_without_orthoreg_state_is_refused(tmp_path):
    trainer = make_trainer(tiny_model(), [], tmp_path, steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], anchor="base_mean"), dirs())
    trainer2 = make_trainer(tiny_model(), [callback], tmp_path, steps=3)
    with pytest.raises(ValueError, match="no orthoreg state"):
        trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_fp16_is_refused(tmp_path):
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0.0))
    trainer = make_trainer(tiny_model(), [callback], tmp_path)
    trainer.args.fp16 = True  # set after construction: TrainingArguments refuses fp16 on CPU by itself
    with pytest.raises(ValueError, match="bf16"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)


@pytest.mark.parametrize(
    "config_kwargs,directions,error,match",
    [
        (dict(layers=[1], proj_weight=1.0), dirs(d=16), DirectionsError, "hidden size"),
        (dict(layers=[7], proj_weight=1.0), dirs(), ValueError, "out of range"),
        (dict(layers=[0], proj_weight=1.0), dirs(layers=(2,)), DirectionsError, "none of the guarded layers"),
        (dict(layers=[1], proj_weight=1.0, anchor="paired"), dirs(), ValueError, "PEFT"),
    ],
)
def test_bad_input_is_refused_at_train_begin(config_kwargs, directions, error, match, tmp_path):
    trainer = make_trainer(tiny_model(), [OrthoRegCallback(OrthoRegConfig(**config_kwargs), directions)], tmp_path)
    with pytest.raises(error, match=match):
        trainer.train()


def test_missing_directions_and_zero_weights_are_refused():
    with pytest.raises(ValueError, match="needs harmful directions"):
        OrthoRegCallback(OrthoRegConfig(proj_weight=1.0))
    with pytest.raises(ValueError, match="every weight"):
        OrthoRegConfig(cov_weight=0.0, proj_weight=0.0)
    with pytest.raises(ValueError, match="cov_weight"):
        OrthoRegConfig(cov_weight=float("nan"))


def test_unsupported_architecture_is_refused(tmp_path):
    model = tiny_model()
    model.config.num_hidden_layers = 5  # no layer list of that length any more
    trainer = make_trainer(model, [OrthoRegCallback(OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0))],
                           tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="layers_path"):
        trainer.train()


def poison_layer(model, layer=1):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        poisoned = hidden.clone()
        poisoned[0, 0, 0] = float("nan")
        return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned

    return model.model.layers[layer].register_forward_hook(hook)


def test_nonfinite_hidden_states_raise_before_reaching_the_weights(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    poison_layer(model)
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0.0))
    trainer = make_trainer(model, [callback], tmp_path)
    with pytest.raises(NonFiniteHiddenStateError, match="layer_1"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_nonfinite_skip_policy_drops_the_penalty(tmp_path, caplog):
    model = tiny_model()
    poison_layer(model, layer=2)
    config = OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=0.0, on_nonfinite="skip")
    callback = OrthoRegCallback(config)
    with caplog.at_level(logging.WARNING, logger="orthoreg.engine.health"):
        callback.regularizer.attach(model)
        model.train()
        out = model(**{k: torch.tensor(v) for k, v in padded_dataset(n=2)[:].items()})
        assert callback.regularizer.check_step() == 1  # the callback calls it in on_pre_optimizer_step
    assert "penalty was dropped" in caplog.text
    assert out.logits.grad_fn is not None
    assert callback.regularizer.pop_metrics() == {"skipped": 1.0}


def test_all_padding_batch_gives_zero_penalty_and_finite_gradients():
    model = tiny_model()
    config = OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=1.0, anchor="absolute")
    callback = OrthoRegCallback(config, dirs(layers=(1,)))
    callback.regularizer.attach(model)
    model.train()
    ids = torch.randint(3, 99, (2, 5))
    out = model(input_ids=ids, attention_mask=torch.zeros(2, 5, dtype=torch.long), labels=ids)
    out.loss.backward()
    metrics = callback.regularizer.pop_metrics()
    assert metrics["cov"] == 0.0 and metrics["proj"] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_eval_and_no_grad_forwards_are_not_regularised():
    model = tiny_model()
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0.0))
    callback.regularizer.attach(model)
    ids = torch.randint(3, 99, (2, 5))
    model.eval()
    model(input_ids=ids)
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    assert callback.regularizer.pop_metrics() == {}
    model(input_ids=ids)
    assert "cov" in callback.regularizer.pop_metrics()


# ---------------------------------------------------------------- TRL
def sft_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "prompt": [word_text(g, int(torch.randint(2, 5, (1,), generator=g))) for _ in range(n)],
        "completion": [word_text(g, int(torch.randint(1, 5, (1,), generator=g))) for _ in range(n)],
    })


@pytest.mark.parametrize("ga", [1, 2])
def test_sft_trainer_gradients(ga, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = tiny_model()
    tokenizer = tiny_tokenizer()
    config = OrthoRegConfig(layers=[1, 2], cov_weight=3e4, proj_weight=20.0, anchor="base_mean")
    directions = dirs(k=2)
    sft_args = dict(max_length=16, bf16=False, gradient_checkpointing=False, dataset_num_proc=None)
    trainer_kwargs = dict(processing_class=tokenizer)
    data = sft_dataset(n=4 * ga)
    plain, plain_batches, _ = train_one_step(copy.deepcopy(model), data, ga=ga, trainer_cls=SFTTrainer,
                                             args_cls=SFTConfig, extra_args=sft_args, trainer_kwargs=trainer_kwargs,
                                             output_dir=str(tmp_path / "plain"))
    got, batches, _ = train_one_step(copy.deepcopy(model), data, callbacks=[OrthoRegCallback(config, directions)],
                                     ga=ga, trainer_cls=SFTTrainer, args_cls=SFTConfig, extra_args=sft_args,
                                     trainer_kwargs=trainer_kwargs, output_dir=str(tmp_path / "reg"))
    assert len(batches) == ga and all(torch.equal(a["input_ids"], b["input_ids"])
                                      for a, b in zip(plain_batches, batches, strict=True))
    penalty = reference_penalty_grads(model, batches, config, directions, ga)
    assert_grads_close(got, {n: plain[n] + penalty.get(n, 0) for n in plain})


def test_dpo_reference_passes_are_not_regularised(tmp_path):
    from trl import DPOConfig, DPOTrainer

    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["o_proj", "down_proj"],
                                                    init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "prompt": [word_text(g, 3) for _ in range(4)],
        "chosen": [word_text(g, 3) for _ in range(4)],
        "rejected": [word_text(g, 3) for _ in range(4)],
    })
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0.0))
    sessions = []
    original = callback.regularizer._penalty

    def counting_penalty(session):
        sessions.append(session.captured[1].requires_grad)
        return original(session)

    callback.regularizer._penalty = counting_penalty
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                     report_to=[], bf16=False, save_strategy="no", logging_steps=1, max_length=16)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[callback])
    trainer.train()
    # Exactly the policy forward(s) are regularised — never the reference pass run with the adapter disabled.
    assert sessions and all(sessions)
    assert len(sessions) <= 2  # chosen+rejected concatenated (1) or separate (2)
    assert "orthoreg/cov" in trainer.state.log_history[0]


# ---------------------------------------------------------------- bf16
def test_bf16_model_gradients_equal_explicit_loss():
    """bf16 weights and activations: the injected gradient equals backpropagating ``loss + λ·penalty`` built by
    hand on the same bf16 forward (penalty math in float32 in both)."""
    from orthoreg.core.capture import layer_hidden
    from orthoreg.terms.penalties import covariance_penalty, projection_penalty

    model = tiny_model().to(torch.bfloat16)
    model.train()
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    directions = dirs(layers=(1,))
    config = OrthoRegConfig(layers=[1], cov_weight=30.0, proj_weight=2.0, anchor="absolute")

    explicit = copy.deepcopy(model)
    captured = {}
    explicit.model.layers[1].register_forward_hook(lambda m, a, o: captured.update({1: layer_hidden(o)}))
    out = explicit(**batch)
    mask = batch["attention_mask"].bool()
    penalty = 30.0 * covariance_penalty(captured[1], mask) + 2.0 * projection_penalty(captured[1], directions[1], mask)
    (out.loss + penalty).backward()

    callback = OrthoRegCallback(config, directions)
    callback.regularizer.attach(model)
    model(**batch).loss.backward()
    assert callback.regularizer.pop_metrics()["total"] == pytest.approx(penalty.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), explicit.parameters(), strict=True):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)  # same ops, same order: bit-equal


def test_bf16_mixed_precision_trainer_step_runs(tmp_path):
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=1.0), dirs())
    trainer = make_trainer(tiny_model(), [callback], tmp_path, steps=2, bf16=True)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor([logged["orthoreg/cov"], logged["orthoreg/proj"]])).all()


def test_two_paired_regularisers_on_one_model_do_not_see_each_others_reference_pass():
    from orthoreg.engine.regularizer import OrthoRegularizer

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["o_proj", "down_proj"],
                                                    init_lora_weights=False))
    model.train()
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    configs = [OrthoRegConfig(layers=[1], proj_weight=1.0, anchor="paired"),
               OrthoRegConfig(layers=[2], proj_weight=1.0, cov_weight=10.0, anchor="paired")]
    alone = []
    for config in configs:
        reg = OrthoRegularizer(config, dirs(), mode="return").attach(model)
        model(**batch)
        alone.append(reg.pending_penalty.item())
        reg.detach()
    together = [OrthoRegularizer(config, dirs(), mode="return").attach(model) for config in configs]
    model(**batch)
    assert [reg.pending_penalty.item() for reg in together] == alone


def test_micro_batches_in_step_follows_the_trainers_chunking():
    from orthoreg.core.trainer_callbacks import micro_batches_in_step

    # 5 micro-batches an epoch, GA = 2: steps of 2, 2, 1 in every epoch.
    assert [micro_batches_in_step(step, 2, 5) for step in range(7)] == [2, 2, 1, 2, 2, 1, 2]
    assert [micro_batches_in_step(step, 4, 8) for step in range(3)] == [4, 4, 4]  # even epochs
    assert micro_batches_in_step(0, 3, 2) == 2  # a single, short step
    assert micro_batches_in_step(7, 4, None) == 4  # no length: the Trainer's endless stream
    assert micro_batches_in_step(3, 1, 5) == 1
