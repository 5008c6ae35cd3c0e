"""The reader term in base-model units (``ReaderPenalty(units="base")``) against float64 references written here:

    reader_base = (1/M) Σ_m ‖ΔW_m V_mᵀ‖²_F / ‖W₀,m V_mᵀ‖²_F

References form ΔW (LoRA: s·B·A; full FT: W − W₀) and W₀Vᵀ explicitly in float64 and differentiate with autograd.
A massive-activation-like base column (one input feature with weights ~1000× the rest, as real models have) makes
the per-module denominators differ by orders of magnitude, so a sum instead of a mean, a missing division or the
wrong W₀ shows. Gradients are compared per parameter tensor to 1e-5 relative (float32 vs float64: ~1e-7).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import orthoreg.reader.base_state as base_state_module
from orthoreg.reader.penalty import ReaderPenalty
from orthoreg.reader.subspaces import InputSubspaces, InputSubspacesError
from tests.models import tiny_model
from tests.trainer_harness import assert_grads_close

torch.set_num_threads(1)

TARGETS = {"llama": ["q_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc", "c_proj"]}
K, LAMBDA = 3, 0.7


def _massive_column(model, targets, scale=1000.0):
    """Weights reading input feature 0 scaled up in the first target module, like a massive-activation dimension."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == targets[0] and hasattr(module, "weight"):
                if type(module).__name__ == "Conv1D":
                    module.weight[0, :] *= scale  # (d_in, d_out)
                else:
                    module.weight[:, 0] *= scale
                return


def _subspaces(model, targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight"):
            d_in = module.nx if type(module).__name__ == "Conv1D" else module.in_features
            bases[name] = torch.randn(K, d_in, generator=g)
    return InputSubspaces(bases)


def _linear_map(weight, family):
    """(d_out, d_in) float64 matrix of a weight as stored (Conv1D stores (d_in, d_out))."""
    w = weight.detach().double()
    return w.T if family == "gpt2" else w


def _batch(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _task_grads(model, data):
    model = copy.deepcopy(model)
    model.train()
    model(**data).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_lora_base_units_value_and_gradient(family, checkpointing):
    base = tiny_model(family)
    _massive_column(base, TARGETS[family])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False,
                        fan_in_fan_out=family == "gpt2")
    model = get_peft_model(base, config)
    subspaces = _subspaces(model.get_base_model(), TARGETS[family])
    data = _batch()
    g_task = _task_grads(model, data)
    params = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n}
    terms, readouts = [], []
    for name, v in subspaces.items():
        prefix = f"base_model.model.{name}"
        layer = model.get_submodule(prefix)
        a, b = params[f"{prefix}.lora_A.default.weight"], params[f"{prefix}.lora_B.default.weight"]
        w0 = _linear_map(layer.base_layer.weight, family)
        readout = (w0 @ v.double().T).square().sum()
        readouts.append(float(readout))
        terms.append((layer.scaling["default"] * b @ a @ v.double().T).square().sum() / readout)
    reference = sum(terms) / len(terms)
    reference.backward()
    reference = reference.detach()
    assert max(readouts) / min(readouts) > 100  # the massive column makes one module's denominator dominate
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model.train()
    with ReaderPenalty(subspaces, LAMBDA, units="base").attach(model) as reader:
        model(**data).loss.backward()
        metrics = reader.pop_metrics()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_close(got, {n: g_task[n] + LAMBDA * params[n].grad.float() if n in params else g_task[n]
                             for n in g_task})
    assert metrics["reader"] == pytest.approx(float(reference), rel=1e-5)
    shares = [metrics[f"reader/{n}"] for n in subspaces.names]
    assert shares == pytest.approx([float(t) / len(terms) for t in terms], rel=1e-5)


def _check_full_finetuning_after_a_resume(model, family, subspaces, units, seed=3):
    """Records W₀Vᵀ (and b₀) at attach, moves every weight ("training so far"), resumes a fresh penalty from the
    saved reference state and compares its gradients and logged value with float64 math written here:
    Σ_m (‖(W − W₀)Vᵀ‖² + ‖b − b₀‖²), each over M·(‖W₀Vᵀ‖² + ‖b₀‖²) in base units; b only where the bias trains."""
    w0 = {n: _linear_map(model.get_submodule(n).weight, family) for n in subspaces.names}
    b0 = {n: model.get_submodule(n).bias.detach().double().clone() for n in subspaces.names
          if model.get_submodule(n).bias is not None}
    reader = ReaderPenalty(subspaces, LAMBDA, units=units).attach(model)
    saved = reader.reference_state()
    reader.detach()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    data = _batch(seed)
    g_task = _task_grads(model, data)
    weights = {n: model.get_submodule(n).weight.detach().double().requires_grad_(True) for n in subspaces.names}
    biases = {n: model.get_submodule(n).bias.detach().double().requires_grad_(True) for n in b0}
    terms = []
    for name, v in subspaces.items():
        w = weights[name].T if family == "gpt2" else weights[name]
        change, readout = ((w - w0[name]) @ v.double().T).square().sum(), (w0[name] @ v.double().T).square().sum()
        if name in biases:
            change, readout = change + (biases[name] - b0[name]).square().sum(), readout + b0[name].square().sum()
        terms.append(change / (readout * len(subspaces)) if units == "base" else change)
    reference = sum(terms)
    reference.backward()
    resumed = ReaderPenalty(subspaces, LAMBDA, units=units)
    resumed.load_reference_state(saved)  # a resumed run: W₀Vᵀ and b₀ from the checkpoint, not the moved weights
    resumed.attach(model)
    model.train()
    model(**data).loss.backward()
    metrics = resumed.pop_metrics()
    resumed.detach()
    want = dict(g_task)
    for name in subspaces.names:
        want[f"{name}.weight"] = want[f"{name}.weight"] + LAMBDA * weights[name].grad.float()
        if name in biases:
            want[f"{name}.bias"] = want[f"{name}.bias"] + LAMBDA * biases[name].grad.float()
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, want)
    assert metrics["reader"] == pytest.approx(float(reference.detach()), rel=1e-5)
    return b0


@pytest.mark.parametrize("family,targets", [("llama", ["up_proj", "o_proj"]), ("gpt2", ["c_fc", "c_proj"])])
def test_full_finetuning_base_units_use_the_recorded_base_and_survive_a_resume(family, targets):
    model = tiny_model(family)
    _massive_column(model, targets)
    b0 = _check_full_finetuning_after_a_resume(model, family, _subspaces(model, targets), "base", seed=2)
    assert bool(b0) == (family == "gpt2")  # GPT-2's Conv1D biases train with the weights


def test_sharded_base_weight_is_read_inside_its_first_forward(monkeypatch):
    """Under ZeRO-3/FSDP2 the base weight is a shard at attach: the denominator is recorded in the base layer's own
    forward instead. Simulated: every weight reports itself sharded while attaching."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=False)
    model = get_peft_model(tiny_model("llama"), config)
    subspaces = _subspaces(model.get_base_model(), TARGETS["llama"])
    eager = ReaderPenalty(subspaces, LAMBDA, units="base").attach(model)
    model.train()
    model(**_batch()).loss.backward()
    want = eager.pop_metrics()["reader"]
    eager.detach()
    monkeypatch.setattr(base_state_module, "is_sharded", lambda weight: True)
    deferred = ReaderPenalty(subspaces, LAMBDA, units="base").attach(model)
    assert deferred.resident_tensors == []  # no denominator (nor V copy) recorded at attach
    monkeypatch.undo()
    model(**_batch()).loss.backward()
    assert deferred.pop_metrics()["reader"] == pytest.approx(want, rel=1e-6)
    assert sum(t.dim() == 0 for t in deferred.resident_tensors) == len(subspaces)  # one denominator per module
    deferred.detach()


def test_a_module_that_reads_nothing_of_its_subspace_is_refused_by_name():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model("llama"), config)
    layer = model.get_submodule("base_model.model.model.layers.1.mlp.up_proj")
    with torch.no_grad():
        layer.base_layer.weight[:, :K] = 0.0  # W₀ ignores input features 0..K-1
    d_in = layer.base_layer.in_features
    subspaces = InputSubspaces({"model.layers.1.mlp.up_proj": torch.eye(d_in)[:K]})  # exactly those features
    with pytest.raises(InputSubspacesError, match=r"model\.layers\.1\.mlp\.up_proj.*units='absolute'"):
        ReaderPenalty(subspaces, LAMBDA, units="base").attach(model)
    ReaderPenalty(subspaces, LAMBDA).attach(model).detach()  # absolute units need no denominator
    with pytest.raises(ValueError, match="units"):
        ReaderPenalty(subspaces, LAMBDA, units="relative")


@pytest.mark.parametrize("units", ["absolute", "base"])
def test_a_trained_bias_is_part_of_the_read_out_and_a_lora_base_bias_is_refused(units):
    """Qwen2's q/k/v projections carry biases; under full fine-tuning they train, and a shifted bias moves every
    read-out of span(V): reader(m) = ‖W Vᵀ − W₀Vᵀ‖² + ‖b − b₀‖² (base units: over ‖W₀Vᵀ‖² + ‖b₀‖²)."""
    model = tiny_model("qwen2")
    targets = ["q_proj", "v_proj", "o_proj"]  # o_proj has no bias
    b0 = _check_full_finetuning_after_a_resume(model, "qwen2", _subspaces(model, targets), units, seed=5)
    assert len(b0) == 2 * 3  # q and v of every layer

    lora = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(NotImplementedError, match=r"q_proj.*bias='all'.*LoraConfig\(bias='none'\)"):
        ReaderPenalty(_subspaces(lora.get_base_model(), ["q_proj"]), LAMBDA).attach(lora)
