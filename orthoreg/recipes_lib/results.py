"""Results of a run (one JSON + one markdown table row, written by rank 0) and the table assembled from many runs.

The table reproduces the benchmark table's columns — rise in harmful output after a benign fine-tune, and the task's
geometric overlap score — with our measured numbers next to the reported ones (``recipes/table.yaml``). "Rise" is
after − before in percentage points of the harmful-output rate (same prompts, sampling settings and seeds).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

SCHEMA = "orthoreg.recipe-result/1"
RESULTS_FILE = "results.json"
ROW_FILE = "table_row.md"
COLUMNS = ("Model", "Fine-tuning task", "Regulariser", "Harmful before", "Harmful after", "Rise (pp)",
           "Overlap score", "Reported rise", "Reported overlap", "Ran on")


def rise_pp(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return 100.0 * (after - before)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "hydra-core", "datasets", "deepspeed"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def device_description(info) -> str:
    import torch

    if info.use_cpu or not torch.cuda.is_available():
        return f"CPU × {info.world_size} process(es)"
    return f"{torch.cuda.get_device_name(0)} × {info.world_size} ({info.strategy})"


def _fmt_rate(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _fmt_pp(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def _fmt_score(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_row(result: dict[str, Any], reported: dict[str, Any] | None = None) -> str:
    """One markdown row for a results dict (``reported`` = the benchmark's numbers for this model × task)."""
    row, harm, overlap = result["row"], result["harmful_rate"], result.get("overlap") or {}
    model = row["model"] + (f" (stand-in for {row['stand_in_for']})" if row.get("stand_in_for") else "")
    reported = reported or {}
    cells = [model, row["task"], row["reg"], _fmt_rate(harm.get("before")), _fmt_rate(harm.get("after")),
             _fmt_pp(harm.get("rise_pp")), _fmt_score(overlap.get("score")), reported.get("rise", ""),
             reported.get("overlap", ""), result["run"]["device"]]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def load_reported(path: str | Path | None) -> list[dict[str, Any]]:
    """The benchmark rows (``recipes/table.yaml``): model, task, reported rise and overlap, label."""
    if path is None or not Path(path).is_file():
        return []
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return list(data.get("rows", []))


def assemble(results: list[dict[str, Any]], reported_rows: list[dict[str, Any]] | None = None) -> str:
    """The markdown table: benchmark rows first (in their order; rows not yet run are listed as such), then any
    other runs; within a row, runs are ordered by regulariser name."""
    reported_rows = reported_rows or []
    key = (lambda r: (r["row"]["model_name"], r["row"]["task_name"]))  # noqa: E731
    by_row: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        by_row.setdefault(key(result), []).append(result)
    lines = [table_header()]
    seen = set()
    for rep in reported_rows:
        k = (rep["model"], rep["task"])
        seen.add(k)
        runs = sorted(by_row.get(k, []), key=lambda r: r["row"]["reg"])
        rep_cells = {"rise": rep.get("reported_rise", ""), "overlap": rep.get("reported_overlap", "")}
        if not runs:
            cells = [rep.get("label", rep["model"]), rep.get("task_label", rep["task"]), "—", "not run", "", "", "",
                     rep_cells["rise"], rep_cells["overlap"], "—"]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        for run in runs:
            lines.append(table_row(run, rep_cells))
    for k in sorted(set(by_row) - seen):
        for run in sorted(by_row[k], key=lambda r: r["row"]["reg"]):
            lines.append(table_row(run))
    return "\n".join(lines) + "\n"


def find_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Every results.json under the given files/folders (recursively), schema-checked."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RESULTS_FILE)))
    out = []
    for f in found:
        data = json.loads(f.read_text(encoding="utf-8"))
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{f} is not an orthoreg recipe result (schema {data.get('schema')!r}, expected {SCHEMA})")
        data["_path"] = str(f)
        out.append(data)
    return out
