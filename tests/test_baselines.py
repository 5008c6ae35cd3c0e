"""The known defences (``orthoreg.baselines``) inside a real Trainer step, against explicit float64 references.

KL-to-base and LDIFS: g_callback == g_task (the same Trainer step without the callback, on the same batches) +
∇ Σ_mb (λ/GA)·term_mb, the term computed here in float64 from the model's own tensors, for GA 1 and 2, PEFT
(adapter disabled = reference) and full fine-tuning with a frozen reference copy, with and without activation
checkpointing. Tolerance 1e-5 relative per parameter tensor: float32 forward/backward of a 3-layer model against
float64 math gives ~1e-7.

CAFT: the Trainer's gradients equal those of an explicitly ablated float64 copy (ablation by module replacement,
not hooks) under the Trainer's own loss normalisation; the hook removes U's component exactly, in training forwards
only, and eval forwards are unchanged.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch import nn

from orthoreg import HarmfulDirections
from orthoreg.baselines import (
    CAFTCallback,
    ConceptAblation,
    EarlyStoppingOnMetric,
    KLToBaseCallback,
    LDIFSCallback,
    interleave,
    kl_to_reference,
)
from orthoreg.core.capture import find_decoder_stack, layer_hidden
from orthoreg.directions.harmful import DirectionsError
from orthoreg.terms.injection import PenaltyScale, inject_penalty
from tests.models import tiny_model
from tests.trainer_harness import assert_grads_close, capture_layers, padded_dataset, train_one_step

torch.set_num_threads(1)

LORA = dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj", "q_proj"], init_lora_weights=False)


# ---------------------------------------------------------------------------------------------- models and runs
def build(kind: str):
    """(model to train, frozen reference or None). ``full``: a fine-tune already 2e-2 away from its base copy."""
    if kind == "peft":
        return get_peft_model(tiny_model("llama"), LoraConfig(**LORA)), None
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model, base


def ce_from_logits(outputs, labels, num_items_in_batch=None):
    """A loss built from ``outputs.logits`` only (the DPO / ``compute_loss_func`` path): shifted token CE."""
    logits, target = outputs.logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss / num_items_in_batch


@pytest.fixture
def legacy_layer_hooks(monkeypatch):
    """Emulates transformers < 5.23 on this version: the checkpoint wraps the decoder layer's ``__call__`` (the
    5.22 code), so layer hooks run inside it and fire again in the recompute (the first call under no_grad with
    reentrant checkpointing)."""
    import functools

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    forward = LlamaDecoderLayer.forward
    if not hasattr(forward, "__wrapped__"):  # transformers < 5.23 itself: nothing to emulate
        return

    def legacy_call(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            kwargs.pop("use_cache", None)
            return self._gradient_checkpointing_func(functools.partial(nn.Module.__call__, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", forward.__wrapped__)
    monkeypatch.setattr(LlamaDecoderLayer, "__call__", legacy_call)


def checkpointing_mode(checkpointing, request):
    """``legacy_*`` modes run the same checkpointing under the < 5.23 hook semantics."""
    if checkpointing is not None and checkpointing.startswith("legacy_"):
        request.getfixturevalue("legacy_layer_hooks")
        return checkpointing.removeprefix("legacy_")
    return checkpointing


_PLAIN: dict = {}


def plain_run(kind: str, ga: int, tmp_path, logits_loss: bool = False):
    """The same Trainer step without any callback (cached: every case of a kind starts from the same weights)."""
    key = (kind, ga, logits_loss)
    if key not in _PLAIN:
        model, _ = build(kind)
        kwargs = {"compute_loss_func": ce_from_logits} if logits_loss else None
        grads, batches, _ = train_one_step(model, padded_dataset(n=4 * ga), ga=ga, trainer_kwargs=kwargs,
                                           output_dir=str(tmp_path / "plain"))
        _PLAIN[key] = (grads, batches)
    return _PLAIN[key]


def term_grads(model, batches, term, weight, ga):
    """∇_θ Σ_mb (λ/GA)·term(model, batch) on a private copy of ``model`` (no checkpointing), float64 math."""
    model = copy.deepcopy(model)
    model.train()
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (weight * term(model, batch) / ga).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_and_compare(kind, ga, callback, term, weight, tmp_path, checkpointing=None, logits_loss=False):
    model, _ = build(kind)
    initial = copy.deepcopy(model)
    if checkpointing == "reentrant" and kind == "peft":
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input to reach LoRA
    kwargs = {"compute_loss_func": ce_from_logits} if logits_loss else None
    got, batches, trainer = train_one_step(model, padded_dataset(n=4 * ga), callbacks=[callback], ga=ga,
                                           checkpointing=checkpointing, trainer_kwargs=kwargs,
                                           output_dir=str(tmp_path / "cb"))
    plain_grads, plain_batches = plain_run(kind, ga, tmp_path, logits_loss)
    assert len(batches) == ga
    for a, b in zip(plain_batches, batches, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    penalty = term_grads(initial, batches, term, weight, ga)
    want = {name: plain_grads[name] + penalty.get(name, 0) for name in plain_grads}
    # The test must be able to fail: the term's gradient is a sizeable part of the total.
    ratio = sum(p.norm() for p in penalty.values()) / sum(g.norm() for g in plain_grads.values())
    assert ratio > 0.05, f"term gradient too small to test against ({ratio:.3g})"
    assert_grads_close(got, want)
    return trainer


# ---------------------------------------------------------------------------------------------- KL to base
def kl_term(reference, mask_policy="attention"):
    """float64 KL(π_θ ‖ π_ref), mean over selected positions; π_ref = adapter disabled or the frozen copy."""

    def term(model, batch):
        ids, attn = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
        with torch.no_grad():
            if reference is None:
                with model.disable_adapter():
                    ref_logits = model(input_ids=ids, attention_mask=attn).logits.double()
            else:
                ref_logits = reference(input_ids=ids, attention_mask=attn).logits.double()
        mask = attn.bool()
        if mask_policy == "labels":
            scored = torch.zeros_like(mask)
            scored[:, :-1] = batch["labels"][:, 1:] != -100
            mask = mask & scored
        log_p, log_q = logits[mask].log_softmax(-1), ref_logits[mask].log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    return term


@pytest.mark.parametrize(("ga", "checkpointing", "mask"),
                         [(1, None, "attention"), (2, "reentrant", "labels"), (1, "legacy_reentrant", "attention")])
def test_kl_peft_reference_gradients(ga, checkpointing, mask, tmp_path, request):
    checkpointing = checkpointing_mode(checkpointing, request)
    weight = 30.0
    callback = KLToBaseCallback(weight, mask=mask)
    trainer = run_and_compare("peft", ga, callback, kl_term(None, mask), weight, tmp_path, checkpointing)
    logged = trainer.state.log_history[0]
    assert logged["kl_to_base/kl"] > 0
    assert logged["kl_to_base/total"] == pytest.approx(weight * logged["kl_to_base/kl"])
    assert not callback.regularizer.attached  # hooks removed when training ends


def test_kl_frozen_copy_gradients(tmp_path):
    _, base = build("full")
    weight = 100.0
    run_and_compare("full", 2, KLToBaseCallback(weight, reference_model=base), kl_term(base), weight, tmp_path)


def test_kl_logits_only_loss_path(tmp_path):
    """A loss built from the logits alone (DPOTrainer, ``compute_loss_func``) gets the term exactly once too."""
    weight = 30.0
    run_and_compare("peft", 2, KLToBaseCallback(weight), kl_term(None), weight, tmp_path, logits_loss=True)


def test_kl_composes_with_orthoreg(tmp_path):
    """KL's reference forward runs after orthoreg's session closed: both terms arrive exactly, even with orthoreg's own
    paired (adapter-disabled) reference forward in the same step."""
    from orthoreg import OrthoRegCallback, OrthoRegConfig
    from tests.trainer_harness import reference_penalty_grads

    config = OrthoRegConfig(layers=[0, 2], cov_weight=3e4, proj_weight=2e3, anchor="paired")
    g = torch.Generator().manual_seed(0)
    dirs = HarmfulDirections({i: torch.randn(2, 32, generator=g) for i in (0, 2)})
    model, _ = build("peft")
    initial = copy.deepcopy(model)
    weight = 30.0
    got, batches, trainer = train_one_step(
        model, padded_dataset(n=4), callbacks=[OrthoRegCallback(config, dirs), KLToBaseCallback(weight)], ga=1,
        output_dir=str(tmp_path / "both"))
    plain_grads, _ = plain_run("peft", 1, tmp_path)
    kl = term_grads(initial, batches, kl_term(None), weight, 1)
    ortho = reference_penalty_grads(initial, batches, config, dirs, 1)
    want = {n: plain_grads[n] + kl.get(n, 0) + ortho.get(n, 0) for n in plain_grads}
    assert_grads_close(got, want)
    logged = trainer.state.log_history[0]
    assert logged["kl_to_base/kl"] > 0 and logged["orthoreg/total"] > 0


def test_kl_inactive_outside_training_forwards():
    model, _ = build("peft")
    reg = KLToBaseCallback(1.0).regularizer.attach(model)
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    model.eval()
    model(input_ids=ids).logits.sum().backward()  # eval mode, with grad (e.g. an audit): no term
    model.train()
    with torch.no_grad():
        model(input_ids=ids)  # DPO's reference pass: no term
    assert reg.pop_metrics() == {}
    reg.detach()


def test_wrapping_output_logits_would_lose_the_term(tmp_path):
    """Why KLToBaseCallback hooks the logits' gradient instead of wrapping ``output.logits``: the Trainer's loss was
    computed inside the LM's forward from the unwrapped tensor, so an identity-Function wrapper never sees a
    gradient and its term silently vanishes."""
    model, _ = build("peft")
    lm = find_decoder_stack(model).lm

    def wrap(module, args, output):
        if module.training and torch.is_grad_enabled():
            output.logits = inject_penalty(output.logits, 1e3 * output.logits.float().square().mean(), PenaltyScale(1.0))
        return output

    handle = lm.register_forward_hook(wrap)
    try:
        got, _, _ = train_one_step(model, padded_dataset(n=4), ga=1, output_dir=str(tmp_path / "naive"))
    finally:
        handle.remove()
    plain_grads, _ = plain_run("peft", 1, tmp_path)
    assert_grads_close(got, plain_grads, rel=1e-6)  # the 1e3-weighted term contributed nothing


def test_kl_to_reference_function():
    g = torch.Generator().manual_seed(0)
    z, zr = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    p, q = z[mask].double().softmax(-1), zr[mask].double().softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert kl_to_reference(z, zr, mask).item() == pytest.approx(want.item(), rel=1e-6)
    assert kl_to_reference(z, z, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_to_reference(z, zr, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------- LDIFS
def ldifs_term(layers, reference):
    def term(model, batch):
        hs = capture_layers(model, layers, batch)
        if reference is None:
            refs = capture_layers(model, layers, batch, peft_disabled=True)
        else:
            with torch.no_grad():
                refs = capture_layers(reference, layers, batch)
        mask = batch["attention_mask"].bool()
        return sum((hs[i].double()[mask] - refs[i].double()[mask]).square().sum(-1).mean() for i in layers)

    return term


@pytest.mark.parametrize(("ga", "checkpointing"),
                         [(1, None), (2, "non_reentrant"), (2, "reentrant"), (2, "legacy_reentrant")])
def test_ldifs_peft_reference_gradients(ga, checkpointing, tmp_path, request):
    checkpointing = checkpointing_mode(checkpointing, request)
    weight, layers = 3.0, [0, 2]
    callback = LDIFSCallback(weight, layers=layers, per_layer_metrics=True)
    trainer = run_and_compare("peft", ga, callback, ldifs_term(layers, None), weight, tmp_path, checkpointing)
    logged = trainer.state.log_history[0]
    assert logged["ldifs/distance"] == pytest.approx(logged["ldifs/distance/layer_0"] + logged["ldifs/distance/layer_2"])
    assert logged["ldifs/total"] == pytest.approx(weight * logged["ldifs/distance"], rel=1e-5)


def test_ldifs_frozen_copy_gradients(tmp_path):
    _, base = build("full")
    weight = 30.0
    callback = LDIFSCallback(weight, layers="all", reference_model=base)
    run_and_compare("full", 2, callback, ldifs_term([0, 1, 2], base), weight, tmp_path, checkpointing="reentrant")


# ---------------------------------------------------------------------------------------------- CAFT
def caft_directions(layers=(0, 1), k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(k, 32, generator=g) for i in layers})


def _layer_inputs(model, indices):
    """Pre-hooks reading each listed layer's input hidden state (the previous layer's output after all hooks)."""
    stack = find_decoder_stack(model)
    seen: dict[int, torch.Tensor] = {}

    def make(i):
        def pre(module, args, kwargs):
            seen.setdefault(i, args[0] if args else kwargs["hidden_states"])

        return pre

    modules = {i: stack.layers[i] for i in indices if i < stack.num_layers}
    handles = [m.register_forward_pre_hook(make(i), with_kwargs=True) for i, m in modules.items()]
    return seen, handles


def test_caft_removes_the_component_exactly_and_only_in_training():
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    dirs = caft_directions()
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    ablation = ConceptAblation(dirs).attach(model)

    # training mode: layer 0's output (= layer 1's input) is exactly h - (h Uᵀ) U of the unhooked model's
    seen, handles = _layer_inputs(model, [1, 2])
    want, want_handles = _layer_inputs(plain, [1])
    model.train(), plain.train()
    out = model(input_ids=ids).logits
    plain(input_ids=ids)
    for h in handles + want_handles:
        h.remove()
    for i, layer in ((1, 0), (2, 1)):
        h, u = seen[i], dirs[layer]
        assert (h @ u.T).abs().max() <= 1e-6 * h.abs().max(), "component along U survived the ablation"
    h0 = want[1]
    torch.testing.assert_close(seen[1], h0 - (h0 @ dirs[0].T) @ dirs[0], rtol=0, atol=1e-6)
    assert not torch.allclose(out, plain(input_ids=ids).logits)
    assert ablation.pop_metrics()["removed"] > 0

    # eval mode (evaluation, generation): bit-identical to the unhooked model, and nothing recorded
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert ablation.pop_metrics() == {}

    # detached: training forwards are plain again
    ablation.detach()
    model.train(), plain.train()
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


class _Ablated(nn.Module):
    """Reference ablation by module replacement (no hooks): layer output minus its projection onto U."""

    def __init__(self, layer: nn.Module, u: torch.Tensor):
        super().__init__()
        self.layer, self.u = layer, u.double()

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        h = layer_hidden(out)
        h = h - (h @ self.u.T) @ self.u
        return h if isinstance(out, torch.Tensor) else (h,) + tuple(out[1:])


def trainer_task_grads(model, batches, dirs=None):
    """float64 ∇ of the Trainer's loss Σ_mb CE_sum(mb) / N_items (N_items: shifted labels over all micro-batches)."""
    model = copy.deepcopy(model).double()
    model.train()
    if dirs is not None:
        layers = find_decoder_stack(model).layers
        for i in dirs.layers:
            layers[i] = _Ablated(layers[i], dirs[i])
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model.zero_grad(set_to_none=True)
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum") / n_items
        loss.backward()
    return {n.replace(".layer.", "."): p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_task_reference_reproduces_the_plain_trainer(tmp_path):
    """Validates ``trainer_task_grads`` (the CAFT reference) against a real Trainer step without ablation."""
    model, _ = build("full")
    plain_grads, batches = plain_run("full", 2, tmp_path)
    assert_grads_close(plain_grads, trainer_task_grads(model, batches))


@pytest.mark.parametrize(("ga", "checkpointing"), [(1, None), (2, "reentrant"), (2, "non_reentrant"),
                                                   (2, "legacy_reentrant"), (2, "legacy_non_reentrant")])
def test_caft_gradients_match_explicit_ablation(ga, checkpointing, tmp_path, request):
    checkpointing = checkpointing_mode(checkpointing, request)
    model, _ = build("full")
    initial = copy.deepcopy(model)
    dirs = caft_directions()
    callback = CAFTCallback(dirs)
    got, batches, trainer = train_one_step(model, padded_dataset(n=4 * ga), callbacks=[callback], ga=ga,
                                           checkpointing=checkpointing, output_dir=str(tmp_path / "caft"))
    want = trainer_task_grads(initial, batches, dirs)
    unablated = trainer_task_grads(initial, batches)
    gap = sum((want[n] - unablated[n]).norm() for n in want) / sum(w.norm() for w in want.values())
    assert gap > 0.05, f"ablation changes the gradient too little to test against ({gap:.3g})"
    assert_grads_close(got, want)
    assert trainer.state.log_history[0]["caft/removed"] > 0
    assert not callback.ablation.attached  # removed when training ends: the trained model evaluates unablated


def test_caft_single_tensor_and_errors():
    model = tiny_model("llama")
    u = torch.randn(2, 32)
    with pytest.raises(ValueError, match="no `layers`"):
        ConceptAblation(u)
    ablation = ConceptAblation(u, layers="last_third").attach(model)
    assert ablation.layer_indices == [2]
    torch.testing.assert_close(ablation._u[2] @ ablation._u[2].T, torch.eye(2), atol=1e-6, rtol=0)
    ablation.detach()
    with pytest.raises(DirectionsError, match="directions cover layers"):
        ConceptAblation(caft_directions([1]), layers=[0, 1]).attach(model)
    with pytest.raises(DirectionsError, match="hidden size"):
        ConceptAblation(torch.randn(1, 16), layers=[0]).attach(model)


# ---------------------------------------------------------------------------------------------- refusals
def test_reference_and_argument_errors():
    model = tiny_model("llama")
    for make in (lambda: KLToBaseCallback(0.1), lambda: LDIFSCallback(0.1)):
        with pytest.raises(ValueError, match="reference_model=copy.deepcopy"):
            make().engine.attach(model)
    with pytest.raises(ValueError, match="model being trained"):
        KLToBaseCallback(0.1, reference_model=model).engine.attach(model)
    with pytest.raises(ValueError, match="different|vocabulary"):
        KLToBaseCallback(0.1, reference_model=tiny_model("llama", vocab_size=50)).engine.attach(model)
    with pytest.raises(ValueError, match="layers of width"):
        LDIFSCallback(0.1, reference_model=tiny_model("llama", num_hidden_layers=2)).engine.attach(model)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="finite number > 0"):
            KLToBaseCallback(bad)
    with pytest.raises(ValueError, match="`mask`"):
        LDIFSCallback(0.1, mask="everything")
    fp16 = types.SimpleNamespace(fp16=True, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="fp16"):
        KLToBaseCallback(0.1).on_train_begin(fp16, None, None, model=model)


# ---------------------------------------------------------------------------------------------- data and stopping
def test_interleave_lists_and_datasets():
    task = [{"x": i, "src": "task"} for i in range(90)]
    aligned = [{"x": 1000 + i, "src": "aligned"} for i in range(50)]
    mixed = interleave(task, aligned, fraction=0.1, seed=3)
    assert len(mixed) == 100 and sum(e["src"] == "aligned" for e in mixed) == 10
    assert sorted(e["x"] for e in mixed if e["src"] == "task") == list(range(90))  # every task example, once
    assert mixed == interleave(task, aligned, fraction=0.1, seed=3)  # deterministic
    assert mixed != interleave(task, aligned, fraction=0.1, seed=4)
    assert len({e["x"] for e in mixed}) == 100  # aligned drawn without replacement

    ds = interleave(Dataset.from_list(task), Dataset.from_list(aligned), fraction=0.1, seed=3)
    assert isinstance(ds, Dataset) and ds.to_list() == mixed

    with pytest.raises(ValueError, match="replacement=True"):
        interleave(task, aligned[:5], fraction=0.5)
    assert len(interleave(task, aligned[:5], fraction=0.5, replacement=True)) == 180
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        interleave(task, aligned, fraction=1.0)
    with pytest.raises(ValueError, match="different columns"):
        interleave(Dataset.from_list(task), Dataset.from_list([{"y": 1}] * 20), fraction=0.1)


def test_early_stopping_on_metric(tmp_path):
    from transformers import Trainer, TrainingArguments

    stopper = EarlyStoppingOnMetric("loss", threshold=1e9, mode="min", patience=2, save=False)
    args = TrainingArguments(output_dir=str(tmp_path / "stop"), per_device_train_batch_size=4, max_steps=6,
                             logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", seed=0)
    trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=padded_dataset(n=32), callbacks=[stopper])
    trainer.train()
    assert stopper.stopped_step == 2 and trainer.state.global_step == 2  # met on logs 1 and 2 (patience 2)
    with pytest.raises(ValueError, match="`mode`"):
        EarlyStoppingOnMetric("loss", 1.0, mode="lowest")
