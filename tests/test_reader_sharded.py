r"""The reader-side weight penalty is exact under sharding: FSDP2 (raw ``fully_shard``) and DeepSpeed ZeRO-3, two gloo
CPU ranks, for LoRA (``OrthoLoRA``; under ZeRO-3 with an accelerate ``Accelerator``) and full fine-tuning (the
engine of ``OrthoRegCallback`` under FSDP2; the callback itself in an HF ``Trainer`` under ZeRO-3).

Two launches of ``tests/distributed/scripts/reader_run.py`` (what each records is described there). The ranks write
the *gathered* parameters they trained (A, B, W) next to their gradients, logged and returned values; the references
here are float64 closed forms written in this file:

- LoRA, :math:`R = \sum_m s_m^2\|B_m A_m V_m^\top\|_F^2`: :math:`\partial R/\partial B = 2s^2 B (AV^\top)(AV^\top)^\top`,
  :math:`\partial R/\partial A = 2s^2 B^\top B A V^\top V`;
- full FT, :math:`R = \sum_m\|(W_m - W_{0,m})V_m^\top\|_F^2`: :math:`\partial R/\partial W = 2 (W - W_0) V^\top V`,

with s read from the modules' own ``scaling`` (α/r = 2, so s and s² differ), V the stored orthonormal bases and W₀
the initial weights rebuilt here from the seed. Task gradients (where the task loss is on) come from an unsharded
single-process float32 copy of the model at the same weights.

What would make these fail: the penalty computed on a rank's shard (half of B's rows, an empty ZeRO partition: a
different value and gradient, or the library's refusal), the penalty or its gradient counted twice or on one rank
only (DP averaging), a wrong s/λ factor, W₀V_mᵀ recorded from a shard or after the first update (the full-FT value
would be 0 or wrong). Tolerance: 1e-5 of the largest reference entry per tensor (float32 vs float64 math and
reduce-scatter summation order: measured ≤ 1e-6); the reader part of every composite gradient is checked to be a
large share of it, so the tolerance cannot hide it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.distributed._launch import launch
from tests.distributed.scripts.callback_common import LR as ZERO3_FULL_LR
from tests.distributed.scripts.lora_common import lora_llama, lora_params, tiny_llama
from tests.distributed.scripts.reader_run import (
    FSDP2_LR,
    FULL_LAMBDA,
    FULL_TARGETS,
    LAMBDA,
    reader_batch,
    reader_subspaces,
)

pytestmark = pytest.mark.distributed
REL = 1e-5
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return launch("reader_run.py", nproc=2, tmp_path=tmp_path_factory.mktemp("reader_fsdp2"),
                  args=["--backends", "fsdp2"], timeout=300)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: DS_BUILD_OPS=0 pip install deepspeed")
    return launch("reader_run.py", nproc=2, tmp_path=tmp_path_factory.mktemp("reader_zero3"),
                  args=["--backends", "zero3"], timeout=300)


# ---------------------------------------------------------------------------------------------- references
def _sub(tensors: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def lora_reference(params: dict, scalings: dict, lam: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Σ_m s²‖B A Vᵀ‖²_F and λ·∂/∂(A, B) of it, float64 closed forms; ``params`` the gathered LoRA weights."""
    spaces = reader_subspaces()
    value, grads = 0.0, {}
    for name in spaces.names:
        key_a, key_b = f"{PREFIX}{name}.lora_A.default.weight", f"{PREFIX}{name}.lora_B.default.weight"
        a, b, v = params[key_a].double(), params[key_b].double(), spaces[name].double()
        s2 = scalings[name] ** 2
        av = a @ v.T  # (r, k)
        value += s2 * (b @ av).square().sum().item()
        grads[key_b] = lam * 2 * s2 * b @ av @ av.T
        grads[key_a] = lam * 2 * s2 * b.T @ b @ a @ v.T @ v
    return value, grads


def full_reference(w: dict, w0: dict, lam: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Σ_m ‖(W − W₀) Vᵀ‖²_F and λ·∂/∂W of it, float64 closed forms, keyed by parameter name."""
    spaces = reader_subspaces(FULL_TARGETS, seed=1)
    value, grads = 0.0, {}
    for name in spaces.names:
        key = f"{name}.weight"
        delta, v = w[key].double() - w0[key].double(), spaces[name].double()
        value += (delta @ v.T).square().sum().item()
        grads[key] = lam * 2 * delta @ v.T @ v
    return value, grads


def lora_task_grads() -> dict[str, torch.Tensor]:
    """∂ task loss / ∂ LoRA parameters of the unsharded single-process model (float32, no orthoreg)."""
    model = lora_llama(seed=0)
    model.train()
    model(**reader_batch()).loss.backward()
    return {n: p.grad.clone() for n, p in lora_params(model).items()}


def full_task_grads(weights: dict) -> dict[str, torch.Tensor]:
    model = tiny_llama(seed=0)
    model.load_state_dict(weights, strict=True)
    model.train()
    model(**reader_batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want))[:4])
    for name, w in want.items():
        w = w.double()
        err = (got[name].double() - w).abs().max().item()
        assert err <= REL * max(w.abs().max().item(), 1e-3), f"{what}: {name} off by {err:.3g} (max {w.abs().max():.3g})"


def reader_share(total: dict, reader: dict) -> float:
    """‖reader part‖ / ‖total‖ over all tensors: the part must be large for the comparison to mean anything."""
    norm = lambda d: sum(t.double().square().sum() for t in d.values()).sqrt().item()  # noqa: E731
    return norm(reader) / norm(total)


# ---------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_lora_reader_value_and_gradients_are_exact(request, backend):
    result = request.getfixturevalue(backend)
    initial = {n: p.detach() for n, p in lora_params(lora_llama(seed=0)).items()}
    task = lora_task_grads()
    for rank, (info, tensors) in enumerate(zip(result.json, result.tensors, strict=True)):
        assert info["world_size"] == 2
        scalings = info[f"{backend}.lora.scaling"]
        assert set(scalings.values()) == {2.0}  # α/r: a factor s where s² belongs would be off by 2
        steps = ["step0.", "step2."] if backend == "zero3" else [""]
        for tag in ("penalty", "full"):
            assert info[f"{backend}.lora.{tag}.sharded"], f"{backend}: A and B were not sharded outside the forward"
            params = _sub(tensors, f"{backend}.lora.{tag}.param.")
            assert_close(params, initial, f"rank {rank} gathered LoRA weights")  # lr = 0 / no step
            value, reader = lora_reference(params, scalings, LAMBDA)
            assert value > 1.0
            assert info[f"{backend}.lora.{tag}.logged"] == pytest.approx(value, rel=REL)
            returned = info[f"{backend}.lora.{tag}.returned"]
            for r in returned if isinstance(returned, list) else [returned]:
                assert r == pytest.approx(LAMBDA * value, rel=REL)  # every step (ZeRO-3: trace, then prefetch)
            want = reader if tag == "penalty" else {n: task[n].double() + reader[n] for n in task}
            if tag == "full":
                assert reader_share(want, reader) > 0.3
            for step in steps:
                grads = _sub(tensors, f"{backend}.lora.{tag}.{step}grad.")
                assert_close(grads, want, f"{backend} rank {rank} {tag} {step or 'step0.'}gradients")
    if backend == "zero3":
        assert result.json[0]["zero3.engine"] == "DeepSpeedEngine" and result.json[0]["zero3.stage"] == 3
        assert result.json[0]["zero3.lora.registered"]  # A, B: external parameters of their LoraLayer


# ---------------------------------------------------------------------------------------------- full fine-tuning
def test_full_finetuning_under_fsdp2(fsdp2):
    w0 = {n: p.detach() for n, p in tiny_llama(seed=0).named_parameters()}
    spaces = reader_subspaces(FULL_TARGETS, seed=1)
    for rank, (info, tensors) in enumerate(zip(fsdp2.json, fsdp2.tensors, strict=True)):
        # Sharded when attached: W₀V_mᵀ was recorded at the first forward, inside the unsharded region, from the
        # full weights (a shard's product would have half the rows or fail).
        assert info["fsdp2.full.sharded_at_attach"] and info["fsdp2.full.recorded_at_attach"] == 0
        base = _sub(tensors, "fsdp2.full.base.")
        assert_close(base, {n: w0[f"{n}.weight"].double() @ spaces[n].double().T for n in spaces.names},
                     f"rank {rank} stored W₀Vᵀ")
        assert info["fsdp2.full.step0.logged"] == 0.0  # W = W₀
        w1 = _sub(tensors, "fsdp2.full.w1.")
        value, reader = full_reference(w1, w0, FULL_LAMBDA)
        assert value > 1e-3
        # W₁ = W₀ − lr·(task gradient at W₀): the update of step 0 really came from the task, not the (zero) penalty.
        task0 = full_task_grads(w0)
        assert_close(w1, {n: w0[n].double() - FSDP2_LR * task0[n].double() for n in w0}, f"rank {rank} W₁")
        task1 = full_task_grads(w1)
        for tag in ("penalty", "full"):
            assert info[f"fsdp2.full.{tag}.logged"] == pytest.approx(value, rel=REL)
            grads = _sub(tensors, f"fsdp2.full.{tag}.grad.")
            zero = {n: torch.zeros_like(p) for n, p in w0.items()}
            want = {n: (0 if tag == "penalty" else task1[n].double()) + reader.get(n, zero[n].double()) for n in w0}
            if tag == "full":
                assert reader_share({n: want[n] for n in reader}, reader) > 0.3
            assert_close(grads, want, f"fsdp2 rank {rank} full-FT {tag} gradients")


def test_full_finetuning_callback_under_zero3(zero3):
    """Trainer + OrthoRegCallback, ZeRO-3, each rank its half of the data, two SGD steps with and without the
    callback. Step 1 (W = W₀): penalty 0, gradient 0, so W₁ is the same in both runs; step 2: the logged value is
    ‖(W₁ − W₀)Vᵀ‖² and the two runs' updates differ by exactly −lr·λ·∂R/∂W at W₁."""
    infos, tensors = zero3.json, zero3.tensors
    assert infos[0]["zero3.full.logs"] == infos[1]["zero3.full.logs"]
    for rank, (info, t) in enumerate(zip(infos, tensors, strict=True)):
        assert info["zero3.full.model_class"] == "DeepSpeedEngine" and info["zero3.task.model_class"] == "DeepSpeedEngine"
        assert info["zero3.full.sharded_at_begin"] > 0  # partitioned when the callback attached
        run = {tag: {s: _sub(t, f"zero3.{tag}.{s}.") for s in ("w0", "w1", "w2")} for tag in ("full", "task")}
        assert_close(run["full"]["w0"], run["task"]["w0"], "initial weights")
        assert_close(run["full"]["w1"], run["task"]["w1"], "W₁ (step 1's reader gradient is 0)")
        w0, w1 = run["full"]["w0"], run["full"]["w1"]
        value, reader = full_reference(w1, w0, FULL_LAMBDA)
        assert value > 1e-2
        logs = info["zero3.full.logs"]
        assert [e["step"] for e in logs] == [1, 2]
        assert logs[0]["orthoreg/reader"] == 0.0
        assert logs[1]["orthoreg/reader"] == pytest.approx(value, rel=REL)
        assert logs[1]["orthoreg/total"] == pytest.approx(FULL_LAMBDA * value, rel=REL)
        update = {tag: {n: run[tag]["w2"][n].double() - run[tag]["w1"][n].double() for n in w0} for tag in run}
        difference = {n: update["full"][n] - update["task"][n] for n in w0}
        want = {n: -ZERO3_FULL_LR * reader[n] if n in reader else torch.zeros_like(w0[n]).double() for n in w0}
        assert reader_share({n: update["full"][n] for n in reader}, {n: want[n] for n in reader}) > 0.3
        assert_close(difference, want, f"zero3 rank {rank} reader part of the step-2 update")
