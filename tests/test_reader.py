"""The reader-side weight penalty (``orthoreg.reader.penalty``) against float64 references written here.

References form ΔW = s·B·A explicitly (or W − W₀) in float64 and differentiate ‖ΔW Vᵀ‖²_F with autograd; the task
gradient comes from an untouched copy of the model. Gradients must match per parameter tensor to 1e-5 relative
(float32 forward/backward of a 3-layer model vs float64 math: ~1e-7), with and without activation checkpointing
(reentrant and not), for Llama (nn.Linear) and GPT-2 (Conv1D, fan_in_fan_out) modules, in a manual loop and inside
a real ``transformers.Trainer`` step with gradient accumulation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from orthoreg.reader.penalty import (
    NonFiniteReaderPenaltyError,
    ReaderPenalty,
    full_reader_penalty,
    lora_reader_penalty,
)
from orthoreg.reader.subspaces import InputSubspaces, InputSubspacesError
from orthoreg.terms.injection import PenaltyScale, inject_penalty
from tests.models import tiny_model
from tests.trainer_harness import assert_grads_close, padded_dataset, train_one_step

torch.set_num_threads(1)

TARGETS = {"llama": ["q_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc", "c_proj"]}
K = 3
LAMBDA = 0.7


def random_subspaces(model, targets, k=K, seed=0) -> InputSubspaces:
    """Random (k, d_in) bases (not orthonormal: InputSubspaces must orthonormalise them) for every target module."""
    g = torch.Generator().manual_seed(seed)
    bases = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight"):
            d_in = module.nx if type(module).__name__ == "Conv1D" else module.in_features
            bases[name] = torch.randn(k, d_in, generator=g)
    return InputSubspaces(bases)


def peft_model(family="llama"):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False,
                        fan_in_fan_out=family == "gpt2")
    return get_peft_model(tiny_model(family), config)


def batch(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lora_reference(model, subspaces) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_m ‖ΔW_m V_mᵀ‖²_F in float64, ΔW formed explicitly, and its gradient per LoRA parameter name."""
    params = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n}
    total = 0
    for name, v in subspaces.items():
        prefix = f"base_model.model.{name}"
        a, b = params[f"{prefix}.lora_A.default.weight"], params[f"{prefix}.lora_B.default.weight"]
        s = model.get_submodule(prefix).scaling["default"]
        delta_w = s * b @ a  # (d_out, d_in): the layout of the update whatever fan_in_fan_out stores
        total = total + (delta_w @ v.double().T).square().sum()
    total.backward()
    return total.detach(), {n: p.grad for n, p in params.items()}


def task_grads(model, data, checkpointing=None):
    model = copy.deepcopy(model)
    model.train()
    model(**data).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def enable_checkpointing(model, checkpointing):
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad


# ----------------------------------------------------------------------------------------------- formulas
def test_lora_formula_equals_explicit_delta_w_and_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 37, generator=g), torch.randn(32, 4, generator=g)
    v = torch.linalg.qr(torch.randn(37, 5, generator=g, dtype=torch.float64)).Q.T
    want = ((1.5 * b.double() @ a.double()) @ v.T).square().sum()
    got = lora_reader_penalty(a, b, v, 1.5)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-6)
    w0 = torch.randn(32, 37, generator=g)
    want_full = ((1.5 * b.double() @ a.double()) @ v.T).square().sum()  # W − W₀ = 1.5·B·A
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = lora_reader_penalty(a, b, v, 1.5)
        got_full = full_reader_penalty(w0 + 1.5 * b @ a, v, (w0.double() @ v.T).float())
    assert got_bf16.dtype == torch.float32 and got_full.dtype == torch.float32
    assert abs(got_bf16.double() - want) / want < 1e-3  # bf16 matmuls would be ~1e-2 off
    assert abs(got_full.double() - want_full) / want_full < 1e-3


def test_full_formula_handles_conv1d_layout():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 37, generator=g)  # nn.Linear layout (d_out, d_in)
    w = w0 + 0.1 * torch.randn(32, 37, generator=g)
    v = torch.linalg.qr(torch.randn(37, 4, generator=g, dtype=torch.float64)).Q.T
    want = ((w.double() - w0.double()) @ v.T).square().sum()
    linear = full_reader_penalty(w, v, (w0.double() @ v.T).float())
    conv = full_reader_penalty(w.T.contiguous(), v, (w0.double() @ v.T).float(), conv1d=True)  # (d_in, d_out)
    assert torch.allclose(linear.double(), want, rtol=1e-5) and torch.allclose(conv.double(), want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- LoRA, manual loop
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_lora_gradients_equal_task_plus_lambda_reader(family, checkpointing):
    model = peft_model(family)
    subspaces = random_subspaces(model.get_base_model(), TARGETS[family])
    data = batch()
    g_task = task_grads(model, data)
    value, g_reader = lora_reference(model, subspaces)
    enable_checkpointing(model, checkpointing)
    model.train()
    with ReaderPenalty(subspaces, LAMBDA).attach(model) as reader:
        reader.grad_scale = 0.5  # e.g. 1/GA
        model(**data).loss.backward()
        metrics = reader.pop_metrics()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: g_task[n] + LAMBDA * 0.5 * g_reader[n].float() for n in g_task}
    assert_grads_close(got, want)
    assert metrics["reader"] == pytest.approx(float(value), rel=1e-5)  # counted once per forward, not per call
    assert len([k for k in metrics if k.startswith("reader/")]) == len(subspaces)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values() if "ReaderPenalty" in repr(h))


def test_return_mode_scales_with_the_loss_under_reentrant_checkpointing():
    model = peft_model()
    subspaces = random_subspaces(model.get_base_model(), TARGETS["llama"])
    data = batch(1)
    g_task = task_grads(model, data)
    _, g_reader = lora_reference(model, subspaces)
    enable_checkpointing(model, "reentrant")
    model.train()
    reader = ReaderPenalty(subspaces, LAMBDA, mode="return").attach(model)
    out = model(**data)
    penalty = reader.pop_penalty()
    ((out.loss + penalty) * 0.25).backward()  # what accelerator.backward does with GA = 4
    reader.detach()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_close(got, {n: 0.25 * (g_task[n] + LAMBDA * g_reader[n].float()) for n in g_task})


# ----------------------------------------------------------------------------------------------- full fine-tuning
@pytest.mark.parametrize("family,targets", [("llama", ["up_proj", "o_proj"]), ("gpt2", ["c_fc", "c_proj"])])
@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_full_finetuning_gradients_against_recorded_base(family, targets, checkpointing):
    model = tiny_model(family)
    subspaces = random_subspaces(model, targets)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in subspaces.names}
    base_bias = {n: model.get_submodule(n).bias.detach().clone() for n in subspaces.names
                 if model.get_submodule(n).bias is not None}
    assert bool(base_bias) == (family == "gpt2")  # GPT-2's Conv1Ds carry biases, Llama's projections none
    reader = ReaderPenalty(subspaces, LAMBDA).attach(model)  # records W₀Vᵀ (and b₀) now
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training so far": every weight moved
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    data = batch(2)
    reader.detach()  # (a deepcopy would carry the hooks along)
    g_task = task_grads(model, data)
    reader.attach(model)  # keeps the W₀Vᵀ recorded at the first attach
    weights = {n: model.get_submodule(n).weight.detach().double().requires_grad_(True) for n in subspaces.names}
    biases = {n: model.get_submodule(n).bias.detach().double().requires_grad_(True) for n in subspaces.names
              if model.get_submodule(n).bias is not None}
    ref = 0
    for name, v in subspaces.items():
        diff = weights[name] - base[name].double()
        if family == "gpt2":  # Conv1D stores (d_in, d_out): its linear map is Wᵀ
            diff = diff.T
        ref = ref + (diff @ v.double().T).square().sum()
        if name in biases:  # a trained bias shifts the read-out of span(V) too
            ref = ref + (biases[name] - base_bias[name].double()).square().sum()
    ref.backward()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.train()
    model(**data).loss.backward()
    metrics = reader.pop_metrics()
    reader.detach()
    want = dict(g_task)
    for name in subspaces.names:
        want[f"{name}.weight"] = want[f"{name}.weight"] + LAMBDA * weights[name].grad.float()
        if name in biases:
            want[f"{name}.bias"] = want[f"{name}.bias"] + LAMBDA * biases[name].grad.float()
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, want)
    assert metrics["reader"] == pytest.approx(float(ref.detach()), rel=1e-5)


# ----------------------------------------------------------------------------------------------- Trainer, GA = 2
class ReaderCallback(TrainerCallback):
    """What OrthoRegCallback's wiring does: attach at train begin, coef = λ/GA per micro-batch."""

    def __init__(self, subspaces):
        self.reader = ReaderPenalty(subspaces, LAMBDA)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.reader.attach(model)
        self.reader.grad_scale = 1 / args.gradient_accumulation_steps

    def on_train_end(self, args, state, control, **kwargs):
        self.reader.detach()


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_inside_a_trainer_step_with_accumulation(tmp_path, checkpointing):
    model = peft_model()
    subspaces = random_subspaces(model.get_base_model(), TARGETS["llama"])
    dataset = padded_dataset(8)
    g_task, _, _ = train_one_step(copy.deepcopy(model), dataset, ga=2, batch_size=2, checkpointing=checkpointing,
                                  output_dir=str(tmp_path / "plain"))
    _, g_reader = lora_reference(model, subspaces)
    got, batches, _ = train_one_step(model, dataset, callbacks=[ReaderCallback(subspaces)], ga=2, batch_size=2,
                                     checkpointing=checkpointing, output_dir=str(tmp_path / "reader"))
    assert len(batches) == 2
    # Each micro-batch adds (λ/GA)·∇reader (the term depends on the weights only): λ·∇reader per step.
    assert_grads_close(got, {n: g_task[n] + LAMBDA * g_reader[n].float() for n in g_task})


# ----------------------------------------------------------------------------------------------- skips and refusals
def test_no_effect_in_eval_no_grad_or_with_the_adapter_disabled():
    model = peft_model()
    subspaces = random_subspaces(model.get_base_model(), TARGETS["llama"])
    data = batch()
    with ReaderPenalty(subspaces, LAMBDA).attach(model) as reader:
        model.eval()
        model(**data).loss.backward()
        assert reader.pop_metrics() == {}
        eval_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.train()
        with torch.no_grad():
            model(**data)
        assert reader.pop_metrics() == {}
        with model.disable_adapter():
            loss = model(**data).loss
        assert reader.pop_metrics() == {}
        assert not loss.requires_grad  # nothing was injected: the frozen base alone carries no gradient
    model.eval()
    model.zero_grad()
    model(**data).loss.backward()  # detached: the same eval gradients as with the (inactive) penalty attached
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, eval_grads, rel=0)


def nan_in_first_module(value=float("nan")):
    """A LoRA model in training mode, its subspaces, and the name of the module whose B[0, 0] is ``value``."""
    model = peft_model()
    subspaces = random_subspaces(model.get_base_model(), TARGETS["llama"])
    name = subspaces.names[0]
    with torch.no_grad():
        model.get_submodule(f"base_model.model.{name}").lora_B["default"].weight[0, 0] = value
    model.train()
    return model, subspaces, name


def test_nan_weights_raise_before_any_gradient():
    model, subspaces, name = nan_in_first_module()
    with ReaderPenalty(subspaces, LAMBDA).attach(model), pytest.raises(NonFiniteReaderPenaltyError, match=name):
        model(**batch())
    assert all(p.grad is None for p in model.parameters())


def test_refuses_dora_merged_unknown_and_wrong_width():
    base = tiny_model("llama")
    subspaces = random_subspaces(base, ["up_proj"])
    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["up_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        ReaderPenalty(subspaces, 1.0).attach(dora)
    merged = peft_model()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        ReaderPenalty(random_subspaces(base, ["up_proj"]), 1.0).attach(merged)
    with pytest.raises(InputSubspacesError, match=r"model\.layers\.9\.mlp\.up_proj"):
        ReaderPenalty(InputSubspaces({"model.layers.9.mlp.up_proj": torch.randn(2, 32)}), 1.0).attach(base)
    with pytest.raises(InputSubspacesError, match=r"down_proj.*32 wide.*reads 37"):
        ReaderPenalty(InputSubspaces({"model.layers.0.mlp.down_proj": torch.randn(2, 32)}), 1.0).attach(base)
    frozen = peft_model()  # k_proj has no adapter: nothing to penalise
    with pytest.raises(InputSubspacesError, match="trainable update"):
        ReaderPenalty(InputSubspaces({"model.layers.0.self_attn.k_proj": torch.randn(2, 32)}), 1.0).attach(frozen)


def test_injection_adds_exactly_the_multiplier_times_the_penalty_gradient():
    x = torch.randn(5, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    out = inject_penalty(x * 2, (w ** 2).sum(), PenaltyScale(0.3))
    out.sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 2.0)) and torch.allclose(w.grad, 0.3 * 2 * w.detach())


def test_step_check_raises_at_check_step_not_in_the_forward():
    model, subspaces, name = nan_in_first_module()
    with pytest.raises(ValueError, match="check"):
        ReaderPenalty(subspaces, LAMBDA, check="never")
    with ReaderPenalty(subspaces, LAMBDA, check="step").attach(model) as reader:
        model(**batch())  # no host sync in the forward: nothing raises yet
        model(**batch())
        with pytest.raises(NonFiniteReaderPenaltyError, match=name):
            reader.check_step()
        reader.check_step()  # the record was reset: a step without forwards passes
    with torch.no_grad():
        model.get_submodule(f"base_model.model.{name}").lora_B["default"].weight[0, 0] = 0.0
    with ReaderPenalty(subspaces, LAMBDA, check="step").attach(model) as reader:
        model(**batch())
        reader.check_step()  # finite: passes
