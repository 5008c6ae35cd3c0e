"""``OrthoRegCallback(OrthoRegConfig.recommended())`` on two CPU ranks: the built-in input subspaces are recorded at
train start (by the main process under DDP; by every rank together under ZeRO-3, whose forward is collective) and
every rank penalises bit-identical V_m — the same V a single process records on the same model. A harm-margin guard
in budget mode beside it keeps one λ on every rank."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import launch  # noqa: E402

pytestmark = pytest.mark.distributed
SCRIPT = "builtin_subspaces_run.py"


def _single_process_subspaces():
    from orthoreg import extract_template_subspaces
    from orthoreg.core.prompts import load_builtin
    from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama

    tokenizer = bpe_tokenizer()
    return extract_template_subspaces(tiny_llama(tokenizer), tokenizer, load_builtin("train").harmless, k=16)


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_every_rank_penalises_the_main_process_subspaces(tmp_path, backend):
    if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.fail("DeepSpeed is not installed: DS_BUILD_OPS=0 pip install deepspeed==0.19.8")
    result = launch(SCRIPT, nproc=2, tmp_path=tmp_path, args=["--backend", backend], timeout=300)
    (info0, info1), (v0, v1) = result.json, result.tensors
    assert info0["world_size"] == info1["world_size"] == 2
    assert info0["sharded_at_begin"] is (backend == "zero3")  # ZeRO-3 partitioned every weight before recording
    assert info0["modules"] == info1["modules"] and v0.keys() == v1.keys()
    assert all(torch.equal(v0[n], v1[n]) for n in v0)  # bit-identical on both ranks
    single = _single_process_subspaces()
    assert sorted(v0) == sorted(single.names) and info0["prompt_count"] == 200
    for name in v0:  # the same subspace as one process records (projectors; float32 sums in another order)
        p_rank, p_single = v0[name].double().T @ v0[name].double(), single[name].double().T @ single[name].double()
        assert torch.allclose(p_rank, p_single, atol=1e-4), name
    assert info0["reader"][0] == 0.0 and info0["reader"][1] > 0  # W = W₀ at step 1; the first update moved it
    # The harm-margin guard: every rank probed (the ZeRO-3 forward is collective), acted on rank 0's fall and set
    # the same reader λ; the readings themselves agree to rounding.
    assert [h["step"] for h in info0["guard"]] == [1, 2] and info0["guard"] == info1["guard"]
    assert info0["reader_weight"] == info1["reader_weight"] == info0["guard"][-1]["weight"]
    for r0, r1 in zip(info0["readings"], info1["readings"], strict=True):
        assert r0.keys() == r1.keys() and all(abs(r0[k] - r1[k]) <= 1e-4 * max(1.0, abs(r0[k])) for k in r0)
