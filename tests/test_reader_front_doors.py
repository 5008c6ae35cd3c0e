"""``OrthoRegConfig(reader_weight=...)`` through both front doors: ``OrthoRegCallback`` (LoRA and full fine-tuning,
inside a real Trainer, resumable) and ``OrthoLoRA`` (a custom loop). References are float64 with ΔW formed
explicitly in the test."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from orthoreg import OrthoLoRA, OrthoRegCallback, OrthoRegConfig
from orthoreg.reader import InputSubspaces
from orthoreg.reader.wiring import READER_BASE_FILE
from tests.models import tiny_model
from tests.trainer_harness import assert_grads_close, make_trainer, padded_dataset, train_one_step

LAMBDA = 0.7
TARGETS = ["q_proj", "up_proj", "down_proj"]


def subspaces(model, k=3, seed=0) -> InputSubspaces:
    g = torch.Generator().manual_seed(seed)
    return InputSubspaces({name: torch.randn(k, module.in_features, generator=g)
                           for name, module in model.named_modules()
                           if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear)})


def lora_model():
    return get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   init_lora_weights=False))


def lora_reader_grads(peft_model, spaces, scale):
    """∇ of scale · Σ_m ‖s B A V_mᵀ‖² in float64, per LoRA parameter name."""
    params = {n: p.detach().double().requires_grad_(True) for n, p in peft_model.named_parameters() if "lora_" in n}
    total = 0
    for name in spaces.names:
        prefix = f"base_model.model.{name}"
        s = peft_model.get_submodule(prefix).scaling["default"]
        delta = s * params[f"{prefix}.lora_B.default.weight"] @ params[f"{prefix}.lora_A.default.weight"]
        total = total + (delta @ spaces[name].double().T).square().sum()
    (scale * total).backward()
    return {n: p.grad for n, p in params.items()}, total.item()


@pytest.mark.parametrize("ga", [1, 2])
def test_callback_lora_gradients_equal_task_plus_float64_reader(tmp_path, ga):
    base = lora_model()
    spaces = subspaces(tiny_model())
    config = OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=LAMBDA)
    data = padded_dataset(n=8)
    plain, _, _ = train_one_step(copy.deepcopy(base), data, ga=ga, output_dir=str(tmp_path / "plain"))
    got, _, trainer = train_one_step(copy.deepcopy(base), data, [OrthoRegCallback(config, input_subspaces=spaces)],
                                     ga=ga, output_dir=str(tmp_path / "reg"))
    reader, value = lora_reader_grads(base, spaces, LAMBDA)  # GA micro-batches of λ/GA each: λ in total
    assert_grads_close(got, {n: plain[n] + reader.get(n, 0) for n in plain})
    logged = trainer.state.log_history[0]
    assert logged["orthoreg/reader"] == pytest.approx(value, rel=1e-5)
    assert logged["orthoreg/total"] == pytest.approx(LAMBDA * value, rel=1e-5)


class WeightsAfterFirstStep(TrainerCallback):
    def __init__(self):
        self.weights = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_callback_full_finetuning_reads_against_the_start_and_resumes(tmp_path):
    model = tiny_model()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    spaces = subspaces(model)
    config = OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=LAMBDA)
    probe = WeightsAfterFirstStep()
    trainer = make_trainer(model, [OrthoRegCallback(config, input_subspaces=spaces), probe], tmp_path / "a", steps=2,
                           learning_rate=1e-2)
    trainer.train()
    w1 = probe.weights
    want = sum(((w1[f"{n}.weight"] - w0[f"{n}.weight"]).double() @ spaces[n].double().T).square().sum().item()
               for n in spaces.names)
    assert trainer.state.log_history[0]["orthoreg/reader"] == 0.0  # W = W₀ on the first step
    assert trainer.state.log_history[1]["orthoreg/reader"] == pytest.approx(want, rel=1e-4)

    # 1 step + checkpoint + 1 step == 2 steps straight: W₀Vᵀ comes back from the checkpoint, not from W₁.
    first = make_trainer(tiny_model(), [OrthoRegCallback(config, input_subspaces=spaces)], tmp_path / "b",
                         steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=1)
    first.train()
    assert (tmp_path / "b" / "checkpoint-1" / READER_BASE_FILE).is_file()
    resumed = make_trainer(tiny_model(seed=3), [OrthoRegCallback(config, input_subspaces=spaces)], tmp_path / "b",
                           steps=2, learning_rate=1e-2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-1"))
    straight = dict(trainer.model.named_parameters())
    worst = max((p - straight[n]).abs().max().item() for n, p in resumed.model.named_parameters())
    assert worst <= 1e-6, worst

    (tmp_path / "b" / "checkpoint-1" / READER_BASE_FILE).unlink()
    again = make_trainer(tiny_model(seed=3), [OrthoRegCallback(config, input_subspaces=spaces)], tmp_path / "b",
                         steps=2, learning_rate=1e-2)
    with pytest.raises(ValueError, match="cannot be recomputed from the resumed weights"):
        again.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-1"))


def test_callback_without_subspaces_records_them_at_train_start_or_reads_the_configured_file(tmp_path):
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=1.0))
    assert callback.config.uses_builtin_subspaces and callback.reader is None  # built in on_train_begin
    with pytest.raises(FileNotFoundError, match="no input-subspaces file or folder at '.*nope'"):
        OrthoRegCallback(OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=1.0,
                                        input_subspaces=str(tmp_path / "nope")))


def test_ortholora_reader_term_through_the_loss(tmp_path):
    base = lora_model()
    spaces = subspaces(tiny_model())
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    plain = copy.deepcopy(base)
    plain.train()
    plain(**batch).loss.backward()
    model = copy.deepcopy(base)
    ortho = OrthoLoRA(model, OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=LAMBDA, warmup_steps=2),
                      input_subspaces=spaces)
    ortho.train()
    out = ortho(**batch)
    (out.loss * 0.5).backward()  # what accelerator.backward does under GA 2: the reader term is scaled with it
    reader, value = lora_reader_grads(base, spaces, LAMBDA * 0.5 * 0.5)  # warm-up w(0) = 1/2, then the 1/2
    assert out.orthoreg_penalty.item() == pytest.approx(LAMBDA * 0.5 * value, rel=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: 0.5 * p.grad + reader.get(n, 0) for n, p in plain.named_parameters() if p.grad is not None}
    assert_grads_close(got, want)
    metrics = ortho.pop_metrics()
    assert metrics["orthoreg/reader"] == pytest.approx(value, rel=1e-5)
    ortho.save_pretrained(tmp_path / "saved")
    loaded = OrthoLoRA.from_pretrained(tiny_model(), tmp_path / "saved")
    assert loaded.reader is not None and loaded.input_subspaces.names == spaces.names


def _nan_in_first_reader_module(peft_model, spaces):
    name = spaces.names[0]
    with torch.no_grad():
        peft_model.get_submodule(f"base_model.model.{name}").lora_B["default"].weight[0, 0] = float("nan")
    return name


def test_callback_stops_the_step_on_a_nan_reader_penalty(tmp_path):
    """The reader term is checked once per optimizer step, in on_pre_optimizer_step: a NaN LoRA weight raises there,
    naming the module, and no optimizer step is taken."""
    from orthoreg.reader.penalty import NonFiniteReaderPenaltyError

    model = lora_model()
    spaces = subspaces(tiny_model())
    name = _nan_in_first_reader_module(model, spaces)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=LAMBDA)
    trainer = make_trainer(model, [OrthoRegCallback(config, input_subspaces=spaces)], tmp_path, steps=1)
    with pytest.raises(NonFiniteReaderPenaltyError, match=name):
        trainer.train()
    assert all(torch.equal(p.detach(), before[n]) or torch.isnan(before[n]).any()
               for n, p in model.named_parameters())
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("front_door", ["callback", "ortholora"])
def test_front_doors_check_the_reader_once_per_optimizer_step(tmp_path, front_door):
    """Both front doors build the reader with check="step" and call its check_step exactly once per optimizer step
    (GA 2: two forwards, one check), so the forward itself never waits for the device."""
    from orthoreg.reader.penalty import ReaderPenalty

    calls = []
    original = ReaderPenalty.check_step

    def counting(self):
        calls.append(self.check)
        return original(self)

    ReaderPenalty.check_step = counting
    try:
        spaces = subspaces(tiny_model())
        config = OrthoRegConfig(layers=[1], proj_weight=0.0, reader_weight=LAMBDA)
        if front_door == "callback":
            trainer = make_trainer(lora_model(), [OrthoRegCallback(config, input_subspaces=spaces)], tmp_path,
                                   steps=2, gradient_accumulation_steps=2)
            trainer.train()
        else:
            class TwoMicroBatches:  # the accelerator interface OrthoLoRA reads: sync_gradients per micro-batch
                sync_gradients = False
                state = None

            accelerator = TwoMicroBatches()
            ortho = OrthoLoRA(lora_model(), config, input_subspaces=spaces, accelerator=accelerator)
            ortho.train()
            batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
            for _step in range(2):
                for micro in range(2):
                    accelerator.sync_gradients = micro == 1
                    ortho(**batch).loss.backward()
    finally:
        ReaderPenalty.check_step = original
    assert calls == ["step", "step"]
