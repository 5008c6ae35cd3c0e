"""``scripts/bench_overhead.py --quick`` runs end to end and writes JSON of the documented schema (not timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # ~30-60 s: a whole (tiny) benchmark run in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_overhead.py")

ARM_KEYS = {
    "step_time_s_median", "step_time_s_q25", "step_time_s_q75", "step_time_samples_s", "ratio_to_plain_median",
    "ratio_to_plain_q25", "ratio_to_plain_q75", "ratio_of_medians", "ratio_of_minimums", "time_overhead_pct", "other_clock",
    "other_clock_step_time_s_median", "other_clock_ratio_to_plain_median", "peak_bytes", "step_delta_bytes",
    "static_bytes", "memory_overhead_pct", "step_delta_overhead_pct", "reg_flops", "flop_ratio_pct", "impl",
    "isolated_s", "isolated_pct_of_plain",
}
CONFIG_KEYS = {
    "model", "mode", "checkpointing", "device", "dtype", "params", "hidden_size", "num_layers", "batch", "seq",
    "selected_tokens", "guarded_layers", "k", "lora_r", "rounds", "steps_per_block", "warmup", "model_step_flops",
    "arms", "gather", "rounds_order",
}
GATHER_KEYS = {"world_size", "n_max_rows", "row_itemsize", "per_layer_forward_bytes", "per_layer_backward_bytes",
               "per_microbatch_bytes", "per_microbatch_bytes_before", "per_microbatch_bytes_suffstats_alternative"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "overhead_quick.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "plain" in proc.stdout  # the printed table
    with open(out) as handle:
        return json.load(handle)


def test_top_level_schema(report):
    assert report["schema_version"] == 1
    assert {"benchmark", "date", "machine", "settings", "configs", "targets", "skipped"} <= set(report)
    settings = report["settings"]
    assert settings["quick"] is True and settings["device"] == "cpu" and settings["threads"] >= 1
    assert settings["clock"] in ("cpu", "wall") and "profiler" in settings["memory_method"]
    assert {"torch", "cpu_count", "platform"} <= set(report["machine"])


def test_every_configuration_ran(report):
    seen = {(c["model"], c["mode"], c["checkpointing"]) for c in report["configs"]}
    assert seen == {("tiny", m, ck) for m in ("full", "lora") for ck in (False, True)}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_arms_and_fields(report, mode, monkeypatch):
    import importlib

    # scripts/ is not a package: the script imports its parts as `overhead.*` from its own folder, as here.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    arms = importlib.import_module("overhead.arms")
    expected = arms.ARMS_LORA if mode == "lora" else arms.ARMS_FULL
    for config in (c for c in report["configs"] if c["mode"] == mode):
        assert set(config) == CONFIG_KEYS
        assert list(config["arms"]) == expected
        assert config["params"]["total"] > 0 and config["model_step_flops"] > 0
        assert len(config["rounds_order"]) == config["rounds"]
        for name, arm in config["arms"].items():
            assert set(arm) == ARM_KEYS, name
            assert len(arm["step_time_samples_s"]) == config["rounds"] * config["steps_per_block"]
            assert arm["step_time_s_median"] > 0 and arm["ratio_to_plain_median"] > 0
            assert arm["peak_bytes"] >= arm["static_bytes"] > 0 and arm["step_delta_bytes"] > 0
            if name == "plain":
                assert arm["ratio_to_plain_median"] == 1.0 and arm["reg_flops"] == 0
                assert arm["memory_overhead_pct"] == 0.0
            else:
                assert arm["reg_flops"] > 0 and arm["flop_ratio_pct"] > 0
        for row in config["gather"]:
            assert set(row) == GATHER_KEYS
            assert row["per_microbatch_bytes"] > 0
        # analytic: with W = 2 each rank sends its padded N_max×d rows (float32 on CPU) and one int64 count per
        # layer forward, nothing backward
        two = next(r for r in config["gather"] if r["world_size"] == 2)
        assert two["per_layer_forward_bytes"] == config["selected_tokens"] * config["hidden_size"] * 4 + 8
        assert two["per_layer_backward_bytes"] == 0
        assert two["per_microbatch_bytes"] == len(config["guarded_layers"]) * two["per_layer_forward_bytes"]


def test_targets_block_is_well_formed(report):
    for target in report["targets"]:
        assert {"model", "mode", "checkpointing", "arm", "metric", "limit_pct", "value_pct", "met"} <= set(target)
        assert isinstance(target["met"], bool)
