"""How the defence summary measures one run: a base build's shares, and one row's rise, over-refusal, capability and
framed rises against the base of the build it was trained from (``scripts/defences_summary.py``).

A rebuild of the aligned base on another CPU differs by rounding (bf16 kernels), and so do its own answers; a row is
therefore measured against its own build's base evaluation, never another's (PLAN.md, amendment 10). Rises are
points over that base (judge v2.1, re-judged from the stored answers); framed rises use the verdicts stored at run
time under the same judge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .defences import UNANCHORED_CATEGORIES
from .residual import TASK_OPENERS, category_attempts, format_shares
from .task_eval import FRAMINGS, SETS, rejudge, shares

__all__ = ["base_of", "framed_attempt", "has_categories", "measure_row", "other_builds", "read_rows"]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def framed_attempt(framed: dict[str, Any]) -> float:
    """The attempt share of a framed evaluation, counted from its stored verdicts (judge v2.1, given at run time)."""
    return shares([a["outcome"] for a in framed["answers"]])["attempt"]


def has_categories(safety: dict[str, Any]) -> bool:
    return all(part in safety for part in SETS) and any(
        a.get("category") in UNANCHORED_CATEGORIES for part in SETS for a in safety[part]["answers"])


def base_of(safety: dict[str, Any], framed: dict[str, Any] | None) -> dict[str, Any]:
    """A base build's attempt and over-refusal shares (judge v2.1), its framed attempt shares and, where its answers
    carry categories, its attempt share on the categories one anchor arm never saw."""
    judged = rejudge(safety)
    base = {"attempt": judged["pooled"]["attempt"], "over_refusal": judged["pooled"]["over_refusal"],
            "framed": {f: framed_attempt(framed[f]) for f in FRAMINGS} if framed else {}}
    if has_categories(judged):
        base["unanchored"] = category_attempts(judged, UNANCHORED_CATEGORIES)["attempt"]
    return base


def measure_row(row: dict[str, Any], base: dict[str, Any], source: str) -> dict[str, Any]:
    """One run's numbers against the base (points and shares in %); capability and framings when the row has them."""
    judged = rejudge(row["safety"])
    pooled = judged["pooled"]
    out = {"seed": row["seed"], "source": source, "rise": 100 * (pooled["attempt"] - base["attempt"]),
           "over_refusal": 100 * pooled["over_refusal"], "metric": row["task_metric"]["score"]}
    if row["task"] in TASK_OPENERS and all(part in judged for part in SETS):  # answers in the task's format
        out["format"] = format_shares(judged, TASK_OPENERS[row["task"]])
    if "unanchored" in base and has_categories(judged):  # the harm categories one anchor arm never saw
        out["unanchored_rise"] = 100 * (category_attempts(judged, UNANCHORED_CATEGORIES)["attempt"] - base["unanchored"])
    if "capability" in row:
        out["capability"] = row["capability"]
    if "conditional" in row:
        out["conditional"] = {f: 100 * (framed_attempt(row["conditional"][f]) - base["framed"][f])
                              for f in FRAMINGS if f in row["conditional"] and f in base["framed"]}
    return out


def other_builds(run_dir: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """The base evaluations of builds other than the reference kept in ``run_dir`` (``base_eval_<sha>.json`` and
    ``base_framed_<sha>.json``), by SHA-256 prefix."""
    out = {}
    for path in sorted(run_dir.glob("base_eval_*.json")):
        sha = path.stem.removeprefix("base_eval_")
        framed = run_dir / f"base_framed_{sha}.json"
        out[sha] = (json.loads(path.read_text())["safety"], json.loads(framed.read_text()) if framed.is_file() else None)
    return out
