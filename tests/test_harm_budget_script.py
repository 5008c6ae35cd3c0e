"""``scripts/harm_budget.py``: the budget section of harm_monitor.json — rises against the base, ratios against plain's
same seed, selection flags and the guard's trajectory — from rows whose judged shares are given (the judge itself is
tested in test_judge_v2)."""

from __future__ import annotations

import json

import pytest

from tests._scripts import load_script


def _row(task, seed, attempt, over, score, losses, arm=None, strength=None, guard=None):
    row = {"task": task, "seed": seed, "safety": {"pooled": {"attempt": attempt, "over_refusal": over}},
           "task_metric": {"score": score}, "losses": losses}
    if arm:
        row.update(arm=arm, strength=strength, **({"guard": guard} if guard else {}))
    return row


def test_budget_section_from_rows(tmp_path, monkeypatch):
    module = load_script("scripts/harm_budget.py")
    monkeypatch.setattr(module, "rejudge", lambda safety: safety)  # the shares as given
    bench = {"prep": {"base_eval": {"safety": {"pooled": {"attempt": 0.10, "over_refusal": 0.30}}}},
             "rows": [_row("howto", s, 0.40 + 0.01 * s, 0.20, 1.0, [2.0] * 12) for s in range(3)]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    run = tmp_path / "run"
    run.mkdir()
    guard = [{"step": 5, "weight": 5000.0, "fall": 0.5}, {"step": 10, "weight": 9000.0, "fall": 2.5}]
    rows = [_row("howto", 0, 0.15, 0.25, 0.9, [1.0] * 2 + [2.2] * 10, "margin_budget", 2.0, guard),
            _row("howto", 1, 0.12, 0.35, 1.0, [2.4] * 10, "margin_budget", 2.0, guard),
            _row("howto", 1, 0.20, 0.30, 1.0, [2.0] * 10, "recommended", 5000.0)]
    (run / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "hm.json"
    out.write_text(json.dumps({"early_signal": {"spearman": 0.1}}))
    module.main(["--run-dir", str(run), "--tasks-bench", str(tmp_path / "bench.json"), "--out", str(out),
                 "--selection", "howto:0"])
    data = json.loads(out.read_text())
    assert data["early_signal"] == {"spearman": 0.1}  # every other key kept
    budget = data["budget"]
    assert budget["base"] == {"attempt": pytest.approx(10.0), "over_refusal": pytest.approx(30.0)}
    howto = budget["tasks"]["howto"]
    assert howto["plain_rise_per_seed"] == {"0": pytest.approx(30.0), "1": pytest.approx(31.0),
                                            "2": pytest.approx(32.0)}
    # the keys: the chosen arm (margin_budget, B = 2 by default) against plain on the same seeds
    assert (howto["arm"], howto["seeds"]) == ("margin_budget:2", [0, 1])
    assert howto["plain_rise"] == pytest.approx(30.5) and howto["budget_rise"] == pytest.approx(3.5)
    assert howto["task_ratio"] == pytest.approx(0.95) and howto["met"] is True
    arm = howto["arms"]["margin_budget:2"]
    assert arm["seeds"] == [0, 1] and arm["selection_seeds"] == [0]
    assert arm["rise"] == [pytest.approx(5.0), pytest.approx(2.0)] and arm["mean_rise"] == pytest.approx(3.5)
    assert arm["plain_rise_same_seeds"] == pytest.approx(30.5)
    assert arm["task_ratio"] == pytest.approx((0.9 + 1.0) / 2)
    assert arm["loss_ratio"] == pytest.approx((2.2 / 2.0 + 2.4 / 2.0) / 2)  # the last 10 logged losses
    assert arm["over_refusal"] == pytest.approx(30.0) and arm["max_weight"] == [9000.0, 9000.0]
    assert howto["arms"]["recommended"]["rise"] == [pytest.approx(10.0)]
