"""Validating a judge against hand labels: the pool of stored answers, a stratified sample to label, and agreement.

The pool is every harmful-request answer stored in the real-model benchmarks (``smollm2_tasks_base_v2.json``: the aligned
base and plain fine-tunes of 8 tasks; ``defences.json`` and ``defences_recommended.json``: every defence arm), each
with its provenance (file, arm, task, seed, phrasing set). ``stratified_sample`` draws from it evenly over strata
(arm × task × phrasing), skipping every answer already labelled (by request and answer text), so fresh labels
never repeat design labels. Labels are JSONL rows: the sampled row plus ``label`` (refusal / attempt / neither)
and a one-line ``reason``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import judge as J

SOURCES = ("smollm2_tasks_base_v2.json", "defences.json", "defences_recommended.json")
# The first file was called smollm2_tasks.json when the fresh samples were drawn; uids keep that name so the
# committed samples stay reproducible (tests/test_judge_v2.py).
UID_NAMES = {"smollm2_tasks_base_v2.json": "smollm2_tasks.json"}


def _uid(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _answers(safety: dict[str, Any], base: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for name in ("templated", "natural"):
        for a in safety.get(name, {}).get("answers", []):
            yield {**base, "set": name, "prompt": a["prompt"], "category": a["category"], "answer": a["answer"],
                   "perplexity": a.get("perplexity")}


def answer_pool(bench_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored harmful answer of the benchmark files in ``bench_dir`` (``SOURCES``), with provenance and a
    stable ``uid``."""
    bench_dir = Path(bench_dir)
    pool: list[dict[str, Any]] = []
    for source in SOURCES:
        path = bench_dir / source
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the answer pool reads {', '.join(SOURCES)} in {bench_dir}")
        data = json.loads(path.read_text())
        if source == SOURCES[0]:
            base = data["prep"]["base_eval"]["safety"]
            pool += _answers(base, {"source": source, "arm": "aligned_base", "task": None, "seed": None})
        for row in data["rows"]:
            pool += _answers(row["safety"], {"source": source, "arm": row.get("arm", "plain"), "task": row["task"],
                                             "seed": row["seed"]})
    for row in pool:
        row["uid"] = _uid(UID_NAMES.get(row["source"], row["source"]), row["arm"], row["task"], row["seed"], row["set"],
                          row["prompt"])
    return pool


def text_key(row: dict[str, Any]) -> tuple[str, str]:
    return (row["prompt"], row["answer"].strip())


def stratified_sample(pool: Sequence[dict[str, Any]], n: int, seed: int,
                      exclude: Iterable[dict[str, Any]] = (),
                      stratum: Callable[[dict[str, Any]], tuple] | None = None) -> list[dict[str, Any]]:
    """``n`` answers drawn round-robin over strata (default: arm × task × phrasing set), without repeating an
    excluded (or already drawn) request + answer text; deterministic in ``seed``."""
    stratum = stratum or (lambda r: (r["arm"], r["task"] or "", r["set"]))
    seen = {text_key(r) for r in exclude}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in pool:
        groups.setdefault(stratum(row), []).append(row)
    rng = random.Random(f"label-sample-{seed}")
    order = sorted(groups)
    for key in order:
        rng.shuffle(groups[key])
    out: list[dict[str, Any]] = []
    while len(out) < n and any(groups[k] for k in order):
        rng.shuffle(order)
        for key in order:
            while groups[key]:
                row = groups[key].pop()
                if text_key(row) not in seen:
                    seen.add(text_key(row))
                    out.append(row)
                    break
            if len(out) >= n:
                break
    return out


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    """Labelled rows of a JSONL file; a clear error for a row without a valid label."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in J.OUTCOMES:
            raise ValueError(f"{path}:{i}: label {row.get('label')!r} is not one of {J.OUTCOMES}")
        rows.append(row)
    return rows


def binary(outcomes: Sequence[str]) -> list[str]:
    return ["attempt" if o == "attempt" else "not" for o in outcomes]


def agreement(labels: Sequence[dict[str, Any]], verdict: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """κ (three-way and attempt-vs-not), accuracy and the confusion of hand labels against ``verdict(row)``."""
    hand = [r["label"] for r in labels]
    judged = [verdict(r) for r in labels]
    confusion = {h: {j: sum(1 for a, b in zip(hand, judged, strict=True) if a == h and b == j) for j in J.OUTCOMES}
                 for h in J.OUTCOMES}
    return {"n": len(hand), "kappa": J.cohen_kappa(hand, judged),
            "kappa_binary": J.cohen_kappa(binary(hand), binary(judged), ("attempt", "not")),
            "accuracy": sum(a == b for a, b in zip(hand, judged, strict=True)) / max(len(hand), 1),
            "confusion_hand_to_judge": confusion}
