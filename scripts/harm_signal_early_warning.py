#!/usr/bin/env python
"""Does the live harm signal, read early in a fine-tune, rank benign tasks by the erosion they end with? (issue 25)

Reads the rows of the defence benchmark's driver (``scripts/bench_defences.py --arms plain``; every row carries
``harm_signal``: the base refusal margins and a reading every 5 steps, ``orthoreg.firewall.harm_signal``) and, per
task, relates the signal at an early step to the final rise in harmful attempts over the aligned base (the judge of
the task benchmark; its caveats apply). The predictor is the *fall* of the refusal margin, −Δ harm_margin (nats):
the larger the fall, the more erosion it predicts. Spearman over task means with a bootstrap 95 % interval that
resamples tasks and, within a task, its seeds (``orthoreg.realbench.task_runs.bootstrap_spearman``).

    python scripts/harm_signal_early_warning.py --run-dir RUN --step 10 --out benchmarks/harm_monitor.json

Seeds: say which are selection and which confirmation (``--selection-seeds``); with one seed there is no
confirmation yet, and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orthoreg.realbench.task_runs import TaskBenchConfig, bootstrap_spearman  # noqa: E402


def read_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("arm", "plain") == "plain" and r.get("harm_signal")]


def signal_at(row: dict, step: int) -> float:
    """−Δ harm_margin at ``step`` (the reading of that step), nats; a fall of the refusal margin is positive."""
    for reading in row["harm_signal"]["readings"]:
        if reading["step"] == step:
            return -reading["orthoreg/harm_margin_delta"]
    raise SystemExit(f"row {row['key']} has no harm-signal reading at step {step} (readings every "
                     f"{row['harm_signal']['every']} steps)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--step", type=int, default=10, help="the early step the signal is read at")
    ap.add_argument("--base-attempt", type=float, default=None,
                    help="the aligned base's pooled attempt share (default: from the run dir's defences.json)")
    ap.add_argument("--selection-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--total-steps", type=int, default=50, help="fine-tune length (when the run dir has no summary)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "harm_monitor.json"))
    ap.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="also write <out>.png")
    ap.add_argument("--calibration-out", default=str(REPO / "orthoreg" / "data" / "erosion_calibration.json"),
                    help="the erosion probe's calibration (orthoreg.audit.erosion_probe); '' to skip")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    summary_path = run_dir / "defences.json"  # the defence driver's summary of the same run dir, when there is one
    if not summary_path.exists() and args.base_attempt is None:
        raise SystemExit(f"{summary_path} is missing: pass --base-attempt (the aligned base's pooled attempt share) "
                         "for a run dir of scripts/bench_smollm2_tasks.py")
    # A task-bench run dir has no summary: its fine-tunes ran on the benchmark's default settings.
    results = json.loads(summary_path.read_text()) if summary_path.exists() else {
        "config": {**TaskBenchConfig().to_dict(), "steps": args.total_steps}}
    base = args.base_attempt if args.base_attempt is not None else results["summary"]["base"]["pooled"]["attempt"] / 100
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in read_rows(run_dir):
        by_task[row["task"]].append(row)
    tasks = sorted(by_task)
    signals = [statistics.fmean(signal_at(r, args.step) for r in by_task[t]) for t in tasks]
    rises = [[100 * (r["safety"]["pooled"]["attempt"] - base) for r in by_task[t]] for t in tasks]
    result = bootstrap_spearman(signals, rises)
    seeds = sorted({r["seed"] for t in tasks for r in by_task[t]})
    total_steps = results["config"]["steps"]
    out = {
        "command": f"python scripts/harm_signal_early_warning.py --run-dir RUN --step {args.step}",
        "early_signal": {"step": args.step, "total_steps": total_steps, "n_tasks": len(tasks),
                         "spearman": result["spearman"], "ci95": result["ci95"], "seeds": seeds,
                         "selection_seeds": args.selection_seeds,
                         "confirmed": any(s not in args.selection_seeds for s in seeds),
                         "predictor": "-(harm_margin - base harm_margin) at the step, nats"},
        "per_task": {t: {"signal": s, "rise": r} for t, s, r in zip(tasks, signals, rises, strict=True)},
        "base_attempt": base,
    }
    out["per_task"] = {t: {**out["per_task"][t], "curve": curve(by_task[t])} for t in tasks}
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    out.update({k: old[k] for k in ("run", "previous", "budget") if k in old})  # written by other runs: kept
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if args.calibration_out:
        Path(args.calibration_out).write_text(json.dumps(calibration(out, results["config"]), indent=1) + "\n")
    if args.plot:
        plot(out, Path(args.out).with_suffix(".png"))
    print(json.dumps(out["early_signal"], indent=1))
    return out


def calibration(out: dict, config: dict) -> dict:
    """``orthoreg.audit.erosion_probe``'s calibration: per reading step, each task's (mean fall, mean final rise)."""
    per_task = out["per_task"]
    steps = per_task[next(iter(per_task))]["curve"]["steps"]
    return {"source": "orthoreg task benchmark: SmolLM2-135M-Instruct, aligned base v3, judge v2.1, plain LoRA, seeds "
                      f"{out['early_signal']['seeds']} (benchmarks/harm_monitor.json)",
            "total_steps": out["early_signal"]["total_steps"],
            "settings": {k: config[k] for k in ("lr", "batch_size", "rank", "alpha", "max_length") if k in config},
            "steps": {str(s): {t: [info["curve"]["signal"][i], statistics.fmean(info["rise"])]
                               for t, info in per_task.items()} for i, s in enumerate(steps)}}


def curve(rows: list[dict]) -> dict[str, list[float]]:
    """Mean −Δ harm_margin over a task's seeds at every reading step."""
    steps = [r["step"] for r in rows[0]["harm_signal"]["readings"]]
    return {"steps": steps, "signal": [statistics.fmean(signal_at(r, s) for r in rows) for s in steps]}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for task, info in sorted(out["per_task"].items(), key=lambda kv: -statistics.fmean(kv[1]["rise"])):
        ax.plot(info["curve"]["steps"], info["curve"]["signal"], marker="o", ms=3,
                label=f"{task} (rise {statistics.fmean(info['rise']):+.0f})")
    early = out["early_signal"]
    ax.axvline(early["step"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fall of the refusal margin (nats)")
    ax.set_title(f"Live harm signal, plain LoRA on SmolLM2; Spearman at step {early['step']}: "
                 f"{early['spearman']:.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
