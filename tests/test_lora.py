"""OrthoLoRA: the weight-space penalty against an explicit float64 ΔW, gradients against an explicit
``task + λ·penalties`` loss (GA 1 and 2, checkpointing off / reentrant / non-reentrant), writer discovery across
families, save/load, bad input, and the example script.

Tolerances: the float32 implementation vs a float64 reference differs by float32 rounding of O(1) quantities, so
relative 1e-5; the float32 OrthoLoRA vs the float32 explicit loss differ only in summation order (measured ≤ 6e-8 on
gradients of size ~0.9), so 1e-6 absolute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed" / "scripts"))
from lora_common import (  # noqa: E402
    directions,
    explicit_loss,
    lora_gpt2,
    lora_grads,
    lora_llama,
    lora_params,
    make_batch,
    tiny_llama,
)

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.directions.harmful import DirectionsError, HarmfulDirections  # noqa: E402
from orthoreg.lora.wrapper import OrthoLoRA, find_residual_writers  # noqa: E402
from tests.models import tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRAD_TOL = 1e-6
REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_and_fresh_accelerate():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _writers(ortho: OrthoLoRA) -> list[tuple[torch.nn.Module, int]]:
    return [(w.module, w.layer) for w in ortho.writers]


# ---------------------------------------------------------------------------------------------- writer discovery
EXPECTED_WRITERS = {
    **{f: ("self_attn.o_proj", "mlp.down_proj") for f in ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3",
                                                          "olmo")},
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED_WRITERS))
def test_structural_writer_discovery(family):
    # LoRA on every linear layer: the rule must pick exactly the two residual writers per layer, not q_proj (also
    # d wide in these configs), the fused qkv, the gate/up projections or the LM head.
    kwargs = {"fan_in_fan_out": True} if family == "gpt2" else {}
    model = get_peft_model(tiny_model(family), LoraConfig(r=2, target_modules="all-linear", **kwargs))
    writers = find_residual_writers(model)
    found = sorted((w.layer, w.name.split(f".{w.layer}.", 1)[1]) for w in writers)
    assert found == sorted((i, n) for i in range(3) for n in EXPECTED_WRITERS[family])


def test_writer_modules_override():
    model = lora_llama(target_modules=("q_proj", "o_proj", "down_proj"))
    writers = find_residual_writers(model, writer_modules=["o_proj"])
    assert [w.name.rsplit(".", 2)[-2:] for w in writers] == [["self_attn", "o_proj"]] * 3
    with pytest.raises(ValueError, match="writes 37 features"):
        find_residual_writers(lora_llama(target_modules=("up_proj",)), writer_modules=["up_proj"])


# ----------------------------------------------------------------------------- weight penalty vs explicit ΔW
def _float64_weight_penalty(ortho: OrthoLoRA, dirs: HarmfulDirections):
    """Σ_writers ‖U_ℓ ΔW‖²_F with ΔW = s·B·A formed explicitly in float64, and its gradient w.r.t. A and B."""
    total = torch.zeros((), dtype=torch.float64)
    leaves = {}
    for writer in ortho.writers:
        m = writer.module
        a = m.lora_A["default"].weight.detach().double().requires_grad_(True)
        b = m.lora_B["default"].weight.detach().double().requires_grad_(True)
        s = m.scaling["default"]
        delta_w = s * b @ a  # (out, in): the reference is allowed to form it
        # PEFT's own ΔW (transposed to (in, out) for Conv1D's fan_in_fan_out) is the same matrix.
        peft_delta = m.get_delta_weight("default").detach().double()
        torch.testing.assert_close(peft_delta.T if m.fan_in_fan_out else peft_delta, delta_w, rtol=1e-6, atol=1e-7)
        total = total + (dirs[writer.layer].double() @ delta_w).square().sum()
        leaves[writer.name] = (a, b)
    total.backward()
    return total, leaves


CASES = {
    "llama": lambda: lora_llama(),
    "llama-rslora": lambda: lora_llama(use_rslora=True, r=4, lora_alpha=6),
    "gpt2-conv1d": lambda: lora_gpt2(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_penalty_matches_float64_delta_w(case):
    peft_model = CASES[case]()
    n_layers = peft_model.get_base_model().config.num_hidden_layers
    dirs = directions(layers=tuple(range(n_layers)), k=3, seed=5)
    lam = 0.7
    ortho = OrthoLoRA(peft_model, OrthoRegConfig(layers="all", proj_weight=0.0, lora_weight=lam), dirs)
    assert len(ortho.writers) == 2 * n_layers
    if case == "llama-rslora":
        assert ortho.writers[0].module.scaling["default"] == pytest.approx(6 / 2)  # α/√r, not α/r
    ortho.train()
    batch = make_batch()
    batch.pop("labels")  # no task loss: backpropagate the penalty alone
    out = ortho(**batch)
    assert out.get("loss") is None
    out.orthoreg_penalty.backward()

    ref, leaves = _float64_weight_penalty(ortho, dirs)
    assert out.orthoreg_penalty.item() == pytest.approx(lam * ref.item(), rel=REL_TOL)
    assert ortho.last_metrics["orthoreg/lora"] == pytest.approx(ref.item(), rel=REL_TOL)
    scale = max(max(a.grad.abs().max().item(), b.grad.abs().max().item()) for a, b in leaves.values())
    for writer in ortho.writers:
        a, b = leaves[writer.name]
        m = writer.module
        torch.testing.assert_close(m.lora_A["default"].weight.grad.double(), lam * a.grad, rtol=0,
                                   atol=REL_TOL * lam * scale)
        torch.testing.assert_close(m.lora_B["default"].weight.grad.double(), lam * b.grad, rtol=0,
                                   atol=REL_TOL * lam * scale)
    # Non-writers (q_proj, c_attn) carry no weight penalty.
    for name, p in lora_params(peft_model).items():
        if not any(w.name in name for w in ortho.writers):
            assert p.grad is None or p.grad.abs().max() == 0, name


# -------------------------------------------------------------- gradients vs the explicit task + λ·penalties loss
CONFIG = dict(layers=[0, 1], cov_weight=0.3, proj_weight=0.7, lora_weight=0.5)


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("checkpointing", ["off", "reentrant", "non_reentrant"])
def test_gradients_equal_explicit_loss(checkpointing, ga):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    peft_model = lora_llama()
    if checkpointing != "off":
        peft_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        peft_model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    dirs = directions()
    config = OrthoRegConfig(anchor="paired", **CONFIG)
    with pytest.warns(UserWarning, match="no weight-space penalty"):  # layer 2's writers are not guarded
        ortho = OrthoLoRA(peft_model, config, dirs, accelerator=accelerator)
    model = accelerator.prepare(ortho)
    model.train()
    batches = [make_batch(seed=i) for i in range(ga)]
    lora_values = []
    for batch in batches:
        with accelerator.accumulate(model):
            out = model(**batch)
            torch.testing.assert_close(out.loss, out.task_loss + out.orthoreg_penalty)
            accelerator.backward(out.loss)
            lora_values.append(ortho.last_metrics["orthoreg/lora"])
    assert ortho.step == 1  # one optimizer step (sync_gradients once per GA micro-batches)
    got = lora_grads(peft_model)

    # Reference: no hooks, no checkpointing; each micro-batch's loss / GA, exactly as accelerate scales the loss.
    ortho.remove_hooks()
    if checkpointing != "off":
        peft_model.gradient_checkpointing_disable()
    peft_model.zero_grad()
    for i, batch in enumerate(batches):
        total, parts = explicit_loss(peft_model, batch, config, dirs, _writers(ortho))
        (total / ga).backward()
        # Each writer counted once per forward, even though checkpointing runs its hook twice.
        assert lora_values[i] == pytest.approx(parts["lora"].item(), rel=1e-6)
    want = lora_grads(peft_model)
    assert _max_diff(got, want) <= GRAD_TOL

    # The weight term is a sizable part of that gradient, so dropping or doubling it would fail the check above.
    peft_model.zero_grad()
    no_lora = OrthoRegConfig(anchor="paired", **{**CONFIG, "lora_weight": 0.0})
    for batch in batches:
        (explicit_loss(peft_model, batch, no_lora, dirs, [])[0] / ga).backward()
    assert _max_diff(lora_grads(peft_model), want) > 1000 * GRAD_TOL


@pytest.mark.parametrize("anchor", ["absolute", "base_mean"])
def test_other_anchors_and_gpt2(anchor):
    peft_model = lora_gpt2()
    dirs = directions(layers=(0, 1))
    config = OrthoRegConfig(layers="all", cov_weight=0.2, proj_weight=0.5, lora_weight=0.4, anchor=anchor)
    ortho = OrthoLoRA(peft_model, config, dirs)
    ortho.train()
    batch = make_batch(seed=7)
    ortho(**batch).loss.backward()
    got = lora_grads(peft_model)
    ortho.remove_hooks()
    peft_model.zero_grad()
    # base_mean: r is computed by the reference itself from this (calibration) batch, not read from OrthoLoRA.
    explicit_loss(peft_model, batch, config, dirs, _writers(ortho))[0].backward()
    assert _max_diff(got, lora_grads(peft_model)) <= GRAD_TOL


def test_warmup_steps_and_eval():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    dirs = directions()
    config = OrthoRegConfig(layers="all", proj_weight=0.0, lora_weight=1.0, warmup_steps=4)
    ortho = accelerator.prepare(OrthoLoRA(lora_llama(), config, dirs, accelerator=accelerator))
    ortho.train()
    batch = make_batch()
    seen = []
    for _ in range(4):  # 4 micro-batches = 2 optimizer steps
        with accelerator.accumulate(ortho):
            out = ortho(**batch)
            seen.append((ortho.step, out.orthoreg_penalty.item() / ortho.last_metrics["orthoreg/lora"]))
    # w(t) = (t + 1) / 4, the step advancing after each accumulation cycle.
    assert seen == [(0, pytest.approx(0.25)), (1, pytest.approx(0.25)), (1, pytest.approx(0.5)),
                    (2, pytest.approx(0.5))]
    metrics = ortho.pop_metrics()
    # the callback's vocabulary (orthoreg.engine.metrics): the warm-up of the last step the values come from
    assert set(metrics) == {"orthoreg/lora", "orthoreg/total", "orthoreg/warmup"} and ortho.pop_metrics() == {}
    assert metrics["orthoreg/warmup"] == pytest.approx(0.5)
    # Evaluation forwards are not regularised: plain model outputs, no step.
    ortho.eval()
    with torch.no_grad():
        out = ortho(**batch)
        plain = ortho.model(**batch)
    assert "orthoreg_penalty" not in out and torch.equal(out.loss, plain.loss) and ortho.step == 2


def test_weight_penalty_gradient_follows_the_loss_scale():
    # What a GradScaler or DeepSpeed's fp16 engine does: backpropagate S·loss and divide the gradients by S later.
    # The weight term's gradient enters inside the model, yet it must carry S like the rest of the loss (a gradient
    # injected with a fixed coefficient would be off by S after unscaling).
    peft_model = lora_llama()
    ortho = OrthoLoRA(peft_model, OrthoRegConfig(layers="all", proj_weight=0.0, lora_weight=3.0), directions())
    ortho.train()
    batch = make_batch()
    ortho(**batch).loss.backward()
    plain = lora_grads(peft_model)
    peft_model.zero_grad()
    (ortho(**batch).loss * 1024.0).backward()  # a power of two: unscaling is exact
    assert _max_diff({k: v / 1024.0 for k, v in lora_grads(peft_model).items()}, plain) == 0


def test_direct_peft_calls_after_a_step_are_not_regularised():
    # After an OrthoLoRA step, the hooks stay installed on the PEFT model; a later direct call of the PEFT model
    # (a recompute would be the only legitimate reason) must not inject anything.
    peft_model = lora_llama()
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model.enable_input_require_grads()
    ortho = OrthoLoRA(peft_model, OrthoRegConfig(layers="all", proj_weight=0.0, lora_weight=5.0), directions())
    ortho.train()
    batch = make_batch()
    ortho(**batch).loss.backward()
    peft_model.zero_grad()
    peft_model(**batch).loss.backward()
    got = lora_grads(peft_model)
    ortho.remove_hooks()
    peft_model.zero_grad()
    peft_model(**batch).loss.backward()
    assert _max_diff(got, lora_grads(peft_model)) == 0


# ------------------------------------------------------------------------------------------------------ save/load
def test_save_load_round_trip(tmp_path):
    dirs = directions(k=2, seed=3)
    config = OrthoRegConfig(layers=[0, 1, 2], cov_weight=0.1, proj_weight=0.6, lora_weight=0.8, anchor="base_mean")
    ortho = OrthoLoRA(lora_llama(seed=4, use_rslora=True), config, dirs)
    ortho.train()
    optimizer = torch.optim.SGD([p for p in ortho.parameters() if p.requires_grad], lr=0.05)
    for seed in range(2):  # train a little so the adapter differs from its initialisation; records r
        ortho(**make_batch(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ortho.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "orthoreg_config.json",
            "orthoreg_directions.safetensors"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # nothing pickled
    saved = json.loads((tmp_path / "orthoreg_config.json").read_text())
    assert saved["state"]["step"] == 2 and saved["config"]["lora_weight"] == 0.8

    loaded = OrthoLoRA.from_pretrained(tiny_llama(seed=4), tmp_path)
    assert loaded.config == config and loaded.step == 2
    assert loaded.penalized_modules == ortho.penalized_modules
    assert all(torch.equal(loaded.directions[i], dirs[i]) for i in dirs.layers)
    assert {k: v.tolist() for k, v in loaded.regularizer.base_reference.items()} == \
        {k: v.tolist() for k, v in ortho.regularizer.base_reference.items()}
    loaded.train()
    batch = make_batch(seed=9)
    out_a, out_b = ortho(**batch), loaded(**batch)
    assert torch.equal(out_a.logits, out_b.logits)
    assert torch.equal(out_a.orthoreg_penalty, out_b.orthoreg_penalty) and torch.equal(out_a.loss, out_b.loss)
    assert ortho.last_metrics == loaded.last_metrics
    assert all(p.requires_grad for p in lora_params(loaded.model).values())  # is_trainable=True: resumable


def test_from_pretrained_refuses_non_orthoreg_or_pickled_folders(tmp_path):
    peft_model = lora_llama()
    peft_model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="orthoreg_config.json"):
        OrthoLoRA.from_pretrained(tiny_llama(), tmp_path / "plain")
    ortho = OrthoLoRA(peft_model, OrthoRegConfig(layers="all", lora_weight=1.0), directions())
    ortho.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "adapter_model.safetensors").rename(tmp_path / "pickled" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        OrthoLoRA.from_pretrained(tiny_llama(), tmp_path / "pickled")


# ------------------------------------------------------------------------------------------------------ bad input
LORA_ONLY = dict(layers="all", proj_weight=0.0, lora_weight=1.0)


def test_no_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layers.*get_peft_model"):
        OrthoLoRA(tiny_llama(), OrthoRegConfig(**LORA_ONLY), directions())


def test_adapters_only_on_non_writers():
    with pytest.raises(ValueError, match="no LoRA module writes into the residual stream.*q_proj"):
        OrthoLoRA(lora_llama(target_modules=("q_proj", "v_proj")), OrthoRegConfig(**LORA_ONLY), directions())
    # Without the weight term the same adapters are fine (activation penalties only).
    OrthoLoRA(lora_llama(target_modules=("q_proj", "v_proj")), OrthoRegConfig(layers="all"), directions())


def test_writers_outside_the_directions():
    # No writer in a layer with directions: an error.
    with pytest.raises(DirectionsError, match="none of the residual-writer LoRA modules"):
        OrthoLoRA(lora_llama(), OrthoRegConfig(layers=[0, 1], proj_weight=0.0, lora_weight=1.0), directions((2,)))
    # Some: a warning naming them; only the covered ones are penalised.
    with pytest.warns(UserWarning, match=r"layers\.0\.self_attn\.o_proj"):
        ortho = OrthoLoRA(lora_llama(), OrthoRegConfig(**LORA_ONLY), directions((1, 2)))
    assert sorted({w.layer for w in ortho.writers}) == [1, 2]
    assert sorted({w.layer for w in ortho.unpenalized_writers}) == [0]


def test_merged_adapters():
    peft_model = lora_llama()
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        OrthoLoRA(peft_model, OrthoRegConfig(**LORA_ONLY), directions())
    peft_model.unmerge_adapter()
    ortho = OrthoLoRA(peft_model, OrthoRegConfig(**LORA_ONLY), directions())
    ortho.train()
    peft_model.merge_adapter()  # merged after wrapping: caught at the next training forward
    with pytest.raises(ValueError, match="merged"):
        ortho(**make_batch())


def test_several_active_adapters():
    peft_model = lora_llama()
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    peft_model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several active LoRA adapters.*set_adapter"):
        OrthoLoRA(peft_model, OrthoRegConfig(**LORA_ONLY), directions())
    with pytest.raises(ValueError, match="mixed-adapter"):
        peft_model.base_model.set_adapter("default")
        OrthoLoRA(peft_model, OrthoRegConfig(**LORA_ONLY), directions())(**make_batch(), adapter_names=["default"] * 2)


def test_wrong_directions():
    with pytest.raises(DirectionsError, match="16-dimensional.*hidden size is 32"):
        OrthoLoRA(lora_llama(), OrthoRegConfig(**LORA_ONLY), directions(hidden=16))
    with pytest.raises(DirectionsError, match="only 3 decoder layers"):
        OrthoLoRA(lora_llama(), OrthoRegConfig(**LORA_ONLY), directions(layers=(0, 5)))
    with pytest.raises(ValueError, match="needs harmful directions"):
        OrthoLoRA(lora_llama(), OrthoRegConfig(**LORA_ONLY))


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # PEFT's note that the tiny Llama has no bias
@pytest.mark.parametrize("variant", ["use_dora", "lora_bias"])
def test_unsupported_lora_forms(variant):
    with pytest.raises(NotImplementedError, match="DoRA" if variant == "use_dora" else "lora_bias"):
        OrthoLoRA(lora_llama(**{variant: True}), OrthoRegConfig(**LORA_ONLY), directions())
    # With lora_weight = 0 they are fine: the activation penalties do not depend on the LoRA form.
    ortho = OrthoLoRA(lora_llama(**{variant: True}), OrthoRegConfig(layers="all"), directions())
    ortho.train()
    assert ortho(**make_batch()).orthoreg_penalty.item() > 0


# ------------------------------------------------------------------------------------------------------- example
def test_example_custom_loop(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("custom_loop_accelerate", REPO / "examples" / "custom_loop_accelerate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        logged = example.main(["--model", "tiny", "--steps", "3", "--grad-accum", "2", "--log-every", "3",
                               "--anchor", "paired", "--cov-weight", "0.1", "--output-dir", str(tmp_path)])
    assert {"task_loss", "orthoreg/proj", "orthoreg/cov", "orthoreg/lora", "orthoreg/total", "orthoreg/warmup"} <= set(logged)
    assert (tmp_path / "orthoreg_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert "step 3/3" in capsys.readouterr().out
