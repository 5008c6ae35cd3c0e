"""The erosion probe (orthoreg.audit.erosion_probe, ``orthoreg audit --probe-steps K``): its calibration's line,
leave-one-task-out error and Spearman against numpy, a dry run that leaves the model untouched and whose signal has
the right sign, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orthoreg.audit import ErosionCalibration, TaskDataError, encode_task_examples, probe_erosion
from orthoreg.commands import audit as audit_cmd
from orthoreg.commands import directions as directions_cmd
from orthoreg.core.prompts import load_builtin
from orthoreg.firewall import RefusalMarginProbe
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama
from tests._directions_helpers import one_torch_thread, run_subcommand, save_planted_assets  # noqa: F401

POINTS = {"a": (0.5, 2.0), "b": (1.5, 9.0), "c": (2.0, 7.5), "d": (3.5, 20.0), "e": (-0.2, -1.0)}


def _calibration():
    return ErosionCalibration.from_dict({"source": "test", "total_steps": 50,
                                         "steps": {"5": POINTS, "10": {k: (v[0] * 2, v[1]) for k, v in POINTS.items()}}})


def test_fit_matches_numpy_least_squares_leave_one_out_and_ranks():
    fit = _calibration().fit(5)
    x = np.array([p[0] for p in POINTS.values()], dtype=np.float64)
    y = np.array([p[1] for p in POINTS.values()], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope, rel=1e-12) and fit["intercept"] == pytest.approx(intercept, rel=1e-12)
    errors = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        s, c = np.polyfit(x[keep], y[keep], 1)
        errors.append(abs(y[i] - (c + s * x[i])))
    assert fit["loo_mae"] == pytest.approx(np.mean(errors), rel=1e-10)
    rx, ry = x.argsort().argsort(), y.argsort().argsort()  # no ties here
    assert fit["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1], rel=1e-12)
    assert fit["n_tasks"] == 5


def test_nearest_step_and_the_shipped_calibration():
    calibration = _calibration()
    assert [calibration.nearest_step(k) for k in (1, 7, 8, 30)] == [5, 5, 10, 10]  # ties go to the earlier step
    shipped = ErosionCalibration.builtin()
    assert shipped.total_steps == 50 and 10 in shipped.steps and len(shipped.steps[10]) == 8
    assert ErosionCalibration.from_dict(json.loads(json.dumps(shipped.to_dict()))) == shipped
    with pytest.raises(ValueError, match=">= 3 tasks"):
        ErosionCalibration.from_dict({"source": "x", "total_steps": 5, "steps": {"5": {"a": (0, 0), "b": (1, 1)}}})


def _harmful_to_sure(tokenizer, n=16):
    examples = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Sure, here it is."}]}
                for p in load_builtin("train").harmful[:n]]
    return encode_task_examples(tokenizer, examples, max_length=48)


def test_dry_run_leaves_the_model_as_it_was_and_its_signal_has_the_right_sign():
    tokenizer = bpe_tokenizer()
    model = tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The probe's own harmful requests answered with its first compliance opener: the refusal margin must fall.
    probe = RefusalMarginProbe()
    probe.record_base(model, tokenizer)
    opener = probe.compliance_openers[0]
    encoded = [(ids + [opener], [-100] * len(ids) + [opener]) for ids in probe.prompt_ids[: len(probe.harmful)]]
    report = probe_erosion(model, tokenizer, encoded, steps=4, lr=2e-2, batch_size=4, rank=4,
                           calibration=_calibration())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert report.fall > 0.05, report
    fit = _calibration().fit(5)
    assert report.calibrated_step == 5
    assert report.predicted_rise == pytest.approx(fit["intercept"] + fit["slope"] * report.fall, rel=1e-12)
    assert report.loo_mae == fit["loo_mae"] and report.settings["lora_targets"]
    # A learning rate too small to move anything: no fall.
    still = probe_erosion(model, tokenizer, encoded, steps=2, lr=1e-12, batch_size=4, rank=4,
                          calibration=_calibration())
    assert abs(still.fall) < 1e-3 and any(line.startswith("erosion probe") for line in still.lines())


def test_dry_run_refusals():
    tokenizer = bpe_tokenizer()
    model = tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="int >= 1"):
        probe_erosion(model, tokenizer, _harmful_to_sure(tokenizer, 2), steps=0)
    with pytest.raises(TaskDataError, match="no token with a loss label"):
        probe_erosion(model, tokenizer, [([1, 2, 3], [-100, -100, -100])], steps=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": "reply to my friend"},
                          {"role": "assistant", "content": "the thing now"}]}] * 4
    return save_planted_assets(tmp_path_factory.mktemp("probe-cli"), rows)


def test_audit_probe_steps_reports_the_prediction_and_its_error(saved, tmp_path, capsys):
    directions = saved / "dirs.safetensors"
    assert run_subcommand(directions_cmd, ["directions", "extract", "--model", str(saved / "model"), "--out",
                                           str(directions), "--prompts", str(saved / "pairs.jsonl"), "--quiet"]) == 0
    common = ["audit", "--model", str(saved / "model"), "--data", str(saved / "task.jsonl"), "--directions",
              str(directions), "--quiet", "--no-recommend"]
    rc = run_subcommand(audit_cmd, [*common, "--out", str(tmp_path / "r"), "--probe-steps", "2",
                                    "--probe-batch-size", "2", "--probe-rank", "2"])
    printed = capsys.readouterr().out
    assert rc == 0
    probe = json.loads((tmp_path / "r" / "overlap.json").read_text())["erosion_probe"]
    assert probe["steps"] == 2 and probe["calibrated_step"] == 5 and probe["n_tasks"] == 8
    assert "erosion probe: 2-step LoRA dry run" in printed and "leave-one-task-out error" in printed
    assert printed.strip().splitlines()[-1].startswith("verdict: ")
    rc = run_subcommand(audit_cmd, [*common, "--out", str(tmp_path / "bad"), "--probe-steps", "-1"])
    assert rc == 2 and "--probe-steps must be >= 0" in capsys.readouterr().err
