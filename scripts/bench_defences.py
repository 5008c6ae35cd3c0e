#!/usr/bin/env python
"""Does a defence hold the erosion of a benign fine-tune on a real model, and is it the geometry? (issue 15)

SmolLM2-135M-Instruct on CPU, the aligned base, tasks, held-out sets and judge of the task benchmark
(``scripts/bench_smollm2_tasks.py``, issue 14); every arm of ``orthoreg.realbench.defences`` on chosen tasks,
seeds and strengths. Runs are appended to ``<run-dir>/rows.jsonl`` and never repeated (the key is task, arm, seed,
strength), so the plan is run phase by phase with the same ``--run-dir``::

    # selection: seeds 0-1 of one task (λ grid of the method first; the controls' scales need plain seed 0)
    python scripts/bench_defences.py --tasks summary --arms plain --seeds 0 1
    python scripts/bench_defences.py --tasks summary --arms reader_harmful_post --seeds 0 1 --strengths 1 10
    python scripts/bench_defences.py --tasks summary --arms all --seeds 0 1 --reader-strength 10
    # confirmation: fresh seeds, other eroding tasks
    python scripts/bench_defences.py --tasks summary --arms all --seeds 2 --reader-strength 10
    python scripts/bench_defences.py --render          # summary JSON, plot and the README's results section
    python scripts/bench_defences.py --quick --out /tmp/q.json    # tiny config-built model, seconds (tests)

The controls' λ: ``reader_<set>`` for set ≠ harmful_post runs at λ · g(harmful_post)/g(set), g the gradient norm of
the penalty at the trained adapter of plain seed 0 on the first task (``defence_subspaces.gradient_norm``), so that
every reader arm pushes equally hard at the same point. ``scales.json`` in the run dir records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orthoreg.realbench import task_bench as B  # noqa: E402
from orthoreg.realbench.defences import ARMS, DefenceJob, reader_set, run_defence  # noqa: E402
from orthoreg.realbench.task_runs import TaskBenchConfig  # noqa: E402
from orthoreg.realbench.workers import (  # noqa: E402
    RowsFile,
    add_worker_arguments,
    driver_settings,
    log,
    run_in_workers,
    write_generated_section,
)

OUT = REPO / "benchmarks" / "defences.json"
README = REPO / "benchmarks" / "README_defences.md"


def directions_path(folder: str) -> str:
    found = sorted(Path(folder).glob("directions-tasks-*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no refusal directions in {folder}: run the task benchmark's prepare first")
    return str(found[0])


def base_build(prep: dict[str, Any]) -> dict[str, Any]:
    """What identifies the aligned base a row was trained from: the SHA-256 of its weights (a rebuild on another CPU
    differs by rounding), the judge's perplexity limit and the base's own pooled outcome shares, so rows of
    different builds are each measured against their own base."""
    import hashlib

    from orthoreg.realbench.task_eval import rejudge

    digest = hashlib.sha256()
    with (Path(prep["aligned_folder"]) / "model.safetensors").open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    pooled = rejudge(prep["base_eval"]["safety"], prep["ppl_limit"])["pooled"]
    return {"sha256": digest.hexdigest()[:16], "ppl_limit": prep["ppl_limit"],
            "pooled": {k: pooled[k] for k in ("attempt", "refusal", "neither", "over_refusal")}}


def controls_scales(prep: dict[str, Any], run_dir: Path, task: str, k: int = 16, log=log) -> dict[str, float]:
    """g(harmful_post)/g(set) per reader set at plain seed 0's adapter on ``task`` (cached in scales.json)."""
    from orthoreg.realbench.aligned import load_aligned
    from orthoreg.realbench.defence_subspaces import build_subspaces, gradient_norm, load_adapter
    from orthoreg.realbench.defences import READER_SETS
    from orthoreg.realbench.tasks import build_task

    path = run_dir / "scales.json"
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached is not None and set(cached["scales"]) >= set(READER_SETS):
        return cached["scales"]
    adapter_path = run_dir / f"adapter-{task}-plain-0.safetensors"
    if not adapter_path.is_file():
        raise FileNotFoundError(f"{adapter_path} is missing: run `--tasks {task} --arms plain --seeds 0` first")
    adapter = load_adapter(adapter_path)
    model, tokenizer = load_aligned(prep["aligned_folder"])
    info = json.loads((Path(prep["aligned_folder"]) / "aligned_info.json").read_text())
    answers = json.loads(Path(prep["answers_path"]).read_text())
    prompts = [t.prompt for t in build_task(task, answers).train]
    norms = dict(cached["gradient_norms"]) if cached is not None else {}  # a set added later: only its norm
    for s in READER_SETS:
        if s not in norms:
            norms[s] = gradient_norm(adapter, build_subspaces(s, model, tokenizer, info, prep["aligned_folder"],
                                                              task_prompts=prompts, task_name=task, k=k, log=log))
    scales = {s: norms["harmful_post"] / n for s, n in norms.items()}
    path.write_text(json.dumps({"task": task, "adapter": adapter_path.name, "gradient_norms": norms,
                                "scales": scales}, indent=1))
    log("controls' scales: " + ", ".join(f"{s} {v:.3g}" for s, v in scales.items()))
    return scales


def plan(args, scales: dict[str, float] | None, others: bool = True) -> list[DefenceJob]:
    """The jobs of the command line: the reader arms only when ``scales`` is given (they need the controls' scales),
    the other arms only with ``others``."""
    arms = list(ARMS) if args.arms == ["all"] else [] if args.arms == ["jobs"] else args.arms
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {ARMS}")
    jobs = []
    for spec in args.jobs or []:  # explicit "task:arm:seed[:strength]", in this order
        task, arm, seed, *rest = spec.split(":")
        strength = float(rest[0]) if rest else (args.reader_strength if reader_set(arm) is not None else None)
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r} in --jobs {spec!r}; choose from {ARMS}")
        if (scales is not None) if reader_set(arm) is not None else others:
            scale = scales[reader_set(arm)] if reader_set(arm) is not None else 1.0
            jobs.append(DefenceJob(task, arm, int(seed), strength, scale, k=args.k))
    for task in args.tasks if args.arms != ["jobs"] else []:
        for arm in arms:
            if reader_set(arm) is not None:
                if scales is not None:
                    jobs += [DefenceJob(task, arm, seed, strength, scales[reader_set(arm)], k=args.k)
                             for strength in args.strengths or [args.reader_strength] for seed in args.seeds]
            elif others:
                strength = args.strengths[0] if (args.strengths and arm != "plain" and len(arms) == 1) else None
                jobs += [DefenceJob(task, arm, seed, strength, k=args.k) for seed in args.seeds]
    return jobs


def run_jobs(args, config: TaskBenchConfig, prep: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Runs what the command line asks that rows.jsonl does not hold: first the arms that need no scale (with plain
    seed 0 of the scale task added when the reader arms need its adapter), then the reader arms."""
    rows_file = RowsFile(run_dir / "rows.jsonl")
    rows = rows_file.rows
    done = {r["key"] for r in rows}
    dirs = directions_path(prep["aligned_folder"])
    scale_task = args.scale_task or args.tasks[0]
    build = base_build(prep)

    def record(row: dict[str, Any]) -> None:
        row["base_build"] = build
        rows_file.append(row)
        done.add(row["key"])
        s = row["safety"]["pooled"]
        log(f"{row['task']} {row['arm']} seed {row['seed']} λ {row['weight']:.3g}: attempts {s['attempt']:.0%} "
            f"refusals {s['refusal']:.0%} over-refusal {s['over_refusal']:.0%}; {row['task_metric']['metric']} "
            f"{row['task_metric']['score']:.2f}; {row['cpu_per_step']:.2f} CPU-s/step, {row['total_seconds']:.0f} s")

    def arguments(job: DefenceJob) -> tuple:
        adapter = str(run_dir / f"adapter-{job.task}-plain-{job.seed}.safetensors") if job.arm == "plain" else None
        return (prep["aligned_folder"], prep["answers_path"], dirs, job, config, prep["ppl_limit"], 1, adapter)

    def run(jobs: list[DefenceJob]) -> None:
        jobs = list({j.key: j for j in jobs if j.key not in done}.values())
        log(f"{len(jobs)} fine-tunes to run ({len(rows)} rows in {rows_file.path})")
        run_in_workers(run_defence, [arguments(j) for j in jobs], args.workers, record)

    if not args.arms:
        return rows
    wanted = [*(ARMS if args.arms == ["all"] else args.arms), *(j.split(":")[1] for j in args.jobs or [])]
    wants_reader = any(reader_set(a) is not None for a in wanted if a in ARMS)
    if not wants_reader or (run_dir / "scales.json").is_file():  # one queue, in the command line's order
        run(plan(args, controls_scales(prep, run_dir, scale_task, k=args.k) if wants_reader else None))
        return rows
    first = plan(args, None)
    first.insert(0, DefenceJob(scale_task, "plain", 0, k=args.k))
    run(first)
    run(plan(args, controls_scales(prep, run_dir, scale_task, k=args.k), others=False))
    return rows


# ----------------------------------------------------------------------------------------------- summary


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(rows: list[dict[str, Any]], prep: dict[str, Any], selection_seeds: list[int],
              selection_task: str | None = None) -> dict[str, Any]:
    """Per task, arm and strength: the rise (points over the aligned base, pooled 96 harmful requests), the task
    metric as a fraction of plain's on the same task and seeds, over-refusal; on all, selection and fresh seeds
    (selection seeds exist only on ``selection_task``, when given: every run of another task is fresh)."""
    from orthoreg.realbench.task_eval import rejudge

    base = rejudge(prep["base_eval"]["safety"], prep["ppl_limit"])
    cells: dict[str, dict[str, Any]] = {}
    builds: dict[str, int] = {}
    for r in rows:
        # Each row against the base it was trained from (rows written before builds were recorded: this prep's).
        build = r.get("base_build")
        limit = build["ppl_limit"] if build else prep["ppl_limit"]
        base_attempt = build["pooled"]["attempt"] if build else base["pooled"]["attempt"]
        name = build["sha256"] if build else "unrecorded"
        builds[name] = builds.get(name, 0) + 1
        safety = rejudge(r["safety"], limit)
        cell = cells.setdefault(f"{r['task']}|{r['arm']}|{r['strength']}", {
            "task": r["task"], "arm": r["arm"], "strength": r["strength"], "weight": r["weight"], "seeds": [],
            "rise": [], "over_refusal": [], "refusal": [], "neither": [], "task_metric": [], "cpu_per_step": []})
        cell["seeds"].append(r["seed"])
        cell["rise"].append(100 * (safety["pooled"]["attempt"] - base_attempt))
        for k in ("over_refusal", "refusal", "neither"):
            cell[k].append(100 * safety["pooled"][k])
        cell["task_metric"].append(r["task_metric"]["score"])
        cell["cpu_per_step"].append(r["cpu_per_step"])
    for cell in cells.values():
        order = sorted(range(len(cell["seeds"])), key=lambda i: cell["seeds"][i])
        for k in ("seeds", "rise", "over_refusal", "refusal", "neither", "task_metric", "cpu_per_step"):
            cell[k] = [cell[k][i] for i in order]
        plain = cells.get(f"{cell['task']}|plain|None")
        chosen_on = set(selection_seeds) if selection_task in (None, cell["task"]) else set()
        for label, wanted in (("all", set(cell["seeds"])), ("selection", set(cell["seeds"]) & chosen_on),
                              ("fresh", set(cell["seeds"]) - chosen_on)):
            idx = [i for i, s in enumerate(cell["seeds"]) if s in wanted]
            if not idx:
                continue
            entry = {"seeds": [cell["seeds"][i] for i in idx], "rise": _stats([cell["rise"][i] for i in idx]),
                     "over_refusal": _stats([cell["over_refusal"][i] for i in idx]),
                     "task_metric": _stats([cell["task_metric"][i] for i in idx])}
            if plain is not None:
                same = [plain["task_metric"][plain["seeds"].index(s)] for s in entry["seeds"] if s in plain["seeds"]]
                if same and statistics.fmean(same) > 0:
                    entry["task_vs_plain"] = entry["task_metric"]["mean"] / statistics.fmean(same)
            cell[label] = entry
    return {"base": {k: {m: 100 * base[k][m] for m in ("attempt", "refusal", "neither", "over_refusal")}
                     for k in ("templated", "natural", "pooled")}, "base_builds": builds, "cells": cells}


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    st = entry["rise"]
    return f"{st['mean']:+.0f} ± {st['sd']:.0f} (n {st['n']})"


def table(summary: dict[str, Any]) -> str:
    lines = ["| task | arm | λ used | seeds | rise, selection seeds | rise, fresh seeds | rise, all seeds [min, max] | "
             "task metric vs plain | over-refusal % | CPU s/step |", "|" + "---|" * 10]
    cells = sorted(summary["cells"].values(), key=lambda c: (c["task"], ARMS.index(c["arm"]), c["strength"] or 0))
    for c in cells:
        a = c["all"]
        vs = a.get("task_vs_plain")
        lines.append(
            f"| {c['task']} | {c['arm']} | {c['weight']:.3g} | {','.join(map(str, c['seeds']))} | "
            f"{_cell(c.get('selection'))} | {_cell(c.get('fresh'))} | {_cell(a)} [{a['rise']['min']:+.0f}, "
            f"{a['rise']['max']:+.0f}] | {'–' if vs is None else f'{vs:.2f}'} | {a['over_refusal']['mean']:.0f} | "
            f"{statistics.fmean(c['cpu_per_step']):.2f} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in summary["cells"].values()})
    fig, axes = plt.subplots(len(tasks), 1, figsize=(11, 3.2 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        cells = sorted((c for c in summary["cells"].values() if c["task"] == task),
                       key=lambda c: (ARMS.index(c["arm"]), c["strength"] or 0))
        for i, c in enumerate(cells):
            st = c["all"]["rise"]
            ax.bar(i, st["mean"], color="tab:red" if c["arm"] == "plain" else
                   "tab:blue" if c["arm"].startswith("reader") else "tab:grey", alpha=0.7)
            ax.scatter([i] * len(c["rise"]), c["rise"], s=10, color="k", zorder=3)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([f"{c['arm']}\nλ {c['weight']:.2g}" for c in cells], rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(5, color="g", lw=0.5, ls="--")
        ax.set_ylabel(f"{task}: rise (pts)")
    fig.suptitle("SmolLM2-135M: rise in harmful attempts over the aligned base per arm (bars: mean; dots: seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(args, prep: dict[str, Any], rows: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    summary = summarise(rows, prep, args.selection_seeds, args.selection_task)
    scales_path = run_dir / "scales.json"
    result = {"date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "selection_seeds": args.selection_seeds,
              "selection_task": args.selection_task,
              "config": TaskBenchConfig().to_dict() if not args.quick else None,
              "scales": json.loads(scales_path.read_text()) if scales_path.is_file() else None,
              "prep": {k: prep[k] for k in ("aligned_folder", "ppl_limit", "ppl_limit_preregistered", "source")
                       if k in prep},
              "summary": summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    if not args.no_plot and summary["cells"]:
        plot(summary, out.with_suffix(".png"))
    if args.readme:
        base = summary["base"]["pooled"]
        section = (f"**Rendered** {result['date']} from `{run_dir}` ({len(rows)} fine-tunes) · selection seeds "
                   f"{args.selection_seeds} of {args.selection_task or 'every task'} · aligned base: harmful "
                   f"attempts {base['attempt']:.0f} %, refusals {base['refusal']:.0f} %, over-refusal "
                   f"{base['over_refusal']:.0f} % (pooled) · rows per base build (weights' SHA-256): "
                   f"{', '.join(f'{k} {n}' for k, n in summary['base_builds'].items())}.\n\n"
                   + table(summary))
        write_generated_section(README, section, writer="scripts/bench_defences.py")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["summary"])
    ap.add_argument("--arms", nargs="+", default=None, help=f"arms to run ('all' = {', '.join(ARMS)}); none: render")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--jobs", nargs="+", default=None, help="explicit task:arm:seed[:strength] jobs, run in this "
                    "order (with --arms jobs)")
    ap.add_argument("--strengths", nargs="+", type=float, default=None,
                    help="λ grid (reader arms; or the one non-reader arm given)")
    ap.add_argument("--reader-strength", type=float, default=10.0, help="λ of the reader arms without --strengths")
    ap.add_argument("--scale-task", default=None, help="task whose plain seed-0 adapter scales the controls")
    ap.add_argument("--k", type=int, default=16, help="directions per module of the input subspaces")
    ap.add_argument("--selection-seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--selection-task", default=None, help="the task λ and the variant were chosen on: its selection "
                    "seeds are the only ones not counted as fresh (default: every task's)")
    add_worker_arguments(ap)  # --workers, --cache-dir, --quick
    ap.add_argument("--run-dir", default=None, help="rows.jsonl, adapters and scales.json (default: <out>.runs)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render", action="store_true", help="summarise the run dir's rows; run nothing")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per fine-tune (default: the benchmark's)")
    ap.add_argument("--base", choices=("v2", "v3"), default="v2",
                    help="the aligned base: v2 (this benchmark's rows so far) or v3 (aligned_v3, the task bench's)")
    args = ap.parse_args(argv)
    if args.readme is None:
        args.readme = not args.quick and Path(args.out) == OUT
    config, align, run_dir = driver_settings(args)
    if align is None and args.base == "v3":
        from orthoreg.realbench.aligned_v3 import AlignV3Config

        align = AlignV3Config()
    if args.quick:
        args.k = min(args.k, 4)
    task_names = list(dict.fromkeys([*args.tasks, *(j.split(":")[0] for j in args.jobs or [])]))
    prep = B.prepare(args.cache_dir, config, task_names, align=align, tiny=args.quick, with_predictors=False, log=log)
    if args.render:
        args.arms = None
    elif args.jobs and not args.arms:  # explicit jobs are something to run, not a render
        args.arms = ["jobs"]
    framed = run_dir / "base_framed.json"  # the base under the conditional-erosion framings, beside the rows
    if "base_framed" in prep and not framed.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        framed.write_text(json.dumps(prep["base_framed"], indent=1))
    rows = run_jobs(args, config, prep, run_dir)
    return finish(args, prep, rows, run_dir)


if __name__ == "__main__":
    main()
