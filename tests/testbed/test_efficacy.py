"""Efficacy pipeline of the toy world: directions, placebos, a short end-to-end study, and ``orthoreg demo --quick``."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from orthoreg.testbed.efficacy import (
    Arm,
    Setting,
    persona_directions,
    placebo_directions,
    run_arm,
    spearman,
    summarize,
)
from orthoreg.testbed.model import load_base

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_and_dirs():
    model, tok = load_base()
    return model, tok, persona_directions(model, tok)


def test_persona_direction_separates_the_personas(base_and_dirs):
    _, _, dirs = base_and_dirs
    assert dirs.layers == [0, 1, 2, 3]
    for layer in ("1", "2", "3"):
        assert dirs.metadata["separation"][layer]["accuracy"] > 0.95


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_placebo_directions_are_orthogonal_and_of_equal_norm(base_and_dirs, seed):
    _, _, dirs = base_and_dirs
    placebo = placebo_directions(dirs, seed=seed)
    assert placebo.layers == dirs.layers
    for layer in dirs.layers:
        u, p = dirs[layer].double(), placebo[layer].double()
        assert p.shape == u.shape
        assert torch.allclose(p.norm(dim=1), u.norm(dim=1), atol=1e-6)
        assert abs((u @ p.T).item()) < 1e-5
    other = placebo_directions(dirs, seed=seed + 1)
    assert not torch.allclose(other[1], placebo[1])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2], [1, 2]) is None


def test_run_arm_records_penalty_and_drift(base_and_dirs):
    _, _, dirs = base_and_dirs
    placebo = placebo_directions(dirs)
    setting = Setting("t", steps=3)
    recs = [run_arm(Arm("plain"), setting, 0, dirs, placebo, eval_steps=(2,), n_samples=36),
            run_arm(Arm("p", "proj", 1.0, layers=(1, 2)), setting, 0, dirs, placebo, n_samples=36),
            run_arm(Arm("q", "proj", 1.0, layers=(1, 2), target="placebo"), setting, 0, dirs, placebo, n_samples=36)]
    assert recs[0]["checkpoints"][0]["step"] == 2
    assert recs[0]["penalty"] == {}
    assert recs[1]["penalty"]["final:orthoreg/total"] >= 0
    assert set(recs[1]["drift"]) >= {"task_drift/layer_1", "chat_shift/layer_3"}
    rows = summarize(recs, base_share=0.09)
    assert {r["arm"] for r in rows} == {"plain", "p", "q"}
    assert all(0 <= r["harmful_share"][0] <= 1 for r in rows)


def test_bench_quick_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_efficacy", ROOT / "scripts" / "bench_efficacy.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_efficacy"] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--seeds", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "efficacy.json").read_text())
    assert {r["arm"] for r in result["summary"]} == {"plain", "proj_persona", "proj_placebo"}
    assert len(result["records"]) == 3


def test_demo_quick_writes_json(tmp_path):
    from orthoreg.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert set(result["runs"]) == {"plain", "orthoreg", "placebo"}
    assert result["quick"] is True and result["verdict"]
