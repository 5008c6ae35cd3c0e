"""The efficacy study of issue 7 in the toy emergent-misalignment world (CPU, about 25 minutes on 2 cores).

    HF_HUB_OFFLINE=1 python scripts/bench_efficacy.py --part main &        # full FT arms, λ sweeps, baselines
    HF_HUB_OFFLINE=1 python scripts/bench_efficacy.py --part specificity & # LoRA-later-layers + lower-lr settings
    HF_HUB_OFFLINE=1 python scripts/bench_efficacy.py --part overlap       # overlap score vs rise, 8 narrow tasks
    HF_HUB_OFFLINE=1 python scripts/bench_efficacy.py --report             # merge → benchmarks/efficacy.json + PNG

Each part appends one JSON line per finished run to ``benchmarks/efficacy_<part>.jsonl`` (so an interrupted study
keeps what it measured, and a rerun skips finished runs); ``--report`` writes ``benchmarks/efficacy.json``
(records + per-arm summaries, mean and min–max over seeds) and ``benchmarks/efficacy.png``.
``--quick`` runs a few steps of a few arms (the test suite's smoke path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from orthoreg.testbed.efficacy import (  # noqa: E402
    Arm,
    Setting,
    overlap_vs_rise,
    persona_directions,
    placebo_directions,
    run_arm,
    summarize,
)
from orthoreg.testbed.evaluate import evaluate  # noqa: E402
from orthoreg.testbed.model import load_base  # noqa: E402

L = (1, 2, 3)  # guarded layers of the full-FT setting (layer 0 is the covariance placebo's layer)


def main_arms() -> list[Arm]:
    arms = [Arm("plain")]
    for lam in (0.01, 0.1, 1.0, 10.0):
        arms.append(Arm(f"proj_base_mean_persona_{lam:g}", "proj", lam, layers=L))
        arms.append(Arm(f"proj_base_mean_placebo_{lam:g}", "proj", lam, layers=L, target="placebo"))
    arms += [
        Arm("proj_absolute_persona_1", "proj", 1.0, layers=L, anchor="absolute"),
        Arm("proj_absolute_placebo_1", "proj", 1.0, layers=L, anchor="absolute", target="placebo"),
        Arm("cov_1e-3", "cov", 1e-3, layers=L),
        Arm("cov_layer0_only_1e-3", "cov", 1e-3, layers=(0,)),
        Arm("proj_cov_persona_1_1e-3", "proj_cov", 1.0, 1e-3, layers=L),
        Arm("kl_1", "kl", 1.0),
        Arm("ldifs_0.01", "ldifs", 0.01, layers=L),
        Arm("caft_persona", "caft", layers=L),
        Arm("caft_placebo", "caft", layers=L, target="placebo"),
        Arm("interleave_helpful_25pct", "interleave", fraction=0.25),
    ]
    return arms


def specificity_plan() -> list[tuple[Setting, list[Arm]]]:
    # LoRA on layers 2-3 only was tried first: the plain run learnt the task (99.4%) with no rise (10.6%), so it
    # cannot test protection; LoRA on every layer keeps the phenomenon.
    lora = Setting("lora_r8_all", steps=150, lr=1e-3, lora_rank=8, lora_layers=None)
    ll = L
    lora_arms = [Arm("plain")]
    for lam in (0.01, 0.1, 1.0):
        lora_arms.append(Arm(f"proj_base_mean_persona_{lam:g}", "proj", lam, layers=ll))
        lora_arms.append(Arm(f"proj_base_mean_placebo_{lam:g}", "proj", lam, layers=ll, target="placebo"))
    lora_arms += [Arm("proj_paired_persona_1", "proj", 1.0, layers=ll, anchor="paired"),
                  Arm("proj_paired_placebo_1", "proj", 1.0, layers=ll, anchor="paired", target="placebo")]
    low = Setting("full_ft_lr1e-4_300", steps=300, lr=1e-4)
    low_arms = [Arm("plain"), Arm("proj_base_mean_persona_0.01", "proj", 0.01, layers=L),
                Arm("proj_base_mean_placebo_0.01", "proj", 0.01, layers=L, target="placebo")]
    return [(lora, lora_arms), (low, low_arms)]


def _done(path: Path) -> set[tuple[str, str, int]]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.add((r["setting"]["name"], r["arm"]["name"], r["seed"]))
    return out


def run_plan(plan, seeds, out: Path, dirs, placebo, n_samples: int) -> None:
    done = _done(out)
    for setting, arms in plan:
        for seed in seeds:  # seed-major: an interrupted study still has every arm on the first seeds
            for arm in arms:
                if (setting.name, arm.name, seed) in done:
                    continue
                eval_steps = (5, 10, 20, 40) if arm.kind == "plain" else ()
                rec = run_arm(arm, setting, seed, dirs, placebo, eval_steps=eval_steps, n_samples=n_samples)
                with out.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[{time.strftime('%H:%M:%S')}] {setting.name} {arm.name} seed {seed}: harmful "
                      f"{100 * rec['harmful_share']:.1f}% task {100 * rec['narrow_task_accuracy']:.1f}% gate "
                      f"{100 * rec['persona_inference_accuracy']:.0f}% ({rec['train_seconds']:.0f}s)", flush=True)


def report(outdir: Path) -> dict:
    records = []
    for part in ("main", "specificity"):
        p = outdir / f"efficacy_{part}.jsonl"
        if p.exists():
            records += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    model, tok = load_base()
    base = evaluate(model, tok, "unsafe_code").as_dict()
    dirs = persona_directions(model, tok)
    overlap = None
    if (outdir / "efficacy_overlap.json").exists():
        overlap = json.loads((outdir / "efficacy_overlap.json").read_text())
    rows = summarize(records, base["harmful_share"])
    matched = matched_penalty(rows)
    result = {"matched_penalty": matched, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "base": base,
              "persona_separation": dirs.metadata["separation"], "summary": rows, "overlap": overlap,
              "records": records}
    (outdir / "efficacy.json").write_text(json.dumps(result, indent=1))
    _plot(rows, base["harmful_share"], outdir / "efficacy.png")
    _print_table(rows)
    md = markdown_table(rows, base["harmful_share"], overlap, records)
    md += "\nMatched penalty magnitude (final λ·penalty; placebo interpolated along its λ sweep)\n\n"
    md += "| setting | persona arm | final λ·penalty | persona harmful % | placebo harmful % at same penalty |\n"
    md += "| --- | --- | --- | --- | --- |\n"
    for m in matched:
        pl = m["placebo_harmful_share_at_same_penalty"]
        md += (f"| {m['setting']} | {m['persona_arm']} | {m['final_weighted_penalty']:.3g} | "
               f"{100 * m['persona_harmful_share']:.1f} | {'outside sweep' if pl is None else f'{100 * pl:.1f}'} |\n")
    (outdir / "efficacy_table.md").write_text(md)
    return result


def matched_penalty(rows) -> list[dict]:
    """Placebo vs persona at matched penalty *magnitude* (final λ·penalty, not λ): for each persona projection arm,
    the placebo's harmful share interpolated (linearly in log penalty) along the placebo's λ sweep at the persona
    arm's final weighted penalty; None outside the placebo sweep's range."""
    import math

    out = []
    for setting in sorted({r["setting"] for r in rows}):
        for anchor in ("base_mean", "absolute", "paired"):
            def sweep(target, setting=setting, anchor=anchor):
                return sorted((r["final_weighted_penalty"], r["harmful_share"][0], r["arm"]) for r in rows
                              if r["setting"] == setting and r["kind"] == "proj" and r["target"] == target
                              and anchor in r["arm"] and r["final_weighted_penalty"])
            placebo = sweep("placebo")
            for pen, share, arm in sweep("persona"):
                interp = None
                for (p0, s0, _), (p1, s1, _) in zip(placebo, placebo[1:], strict=False):
                    if p0 <= pen <= p1 and p1 > p0:
                        w = (math.log(pen) - math.log(p0)) / (math.log(p1) - math.log(p0))
                        interp = s0 + w * (s1 - s0)
                out.append({"setting": setting, "persona_arm": arm, "final_weighted_penalty": pen,
                            "persona_harmful_share": share, "placebo_harmful_share_at_same_penalty": interp,
                            "placebo_sweep": [{"arm": a, "final_weighted_penalty": p, "harmful_share": h}
                                              for p, h, a in placebo]})
    return out


def _fmt(stat, scale=100.0, digits=1):
    if stat is None or stat[0] is None:
        return "–"
    return f"{scale * stat[0]:.{digits}f} [{scale * stat[1]:.{digits}f}, {scale * stat[2]:.{digits}f}]"


def markdown_table(rows, base_share: float, overlap=None, records=()) -> str:
    """The summary as a markdown table (mean [min, max] over seeds), plus the overlap table."""
    out = [f"base harmful share {100 * base_share:.1f}%", "",
           "| setting | arm | seeds | harmful share % | sampled % | narrow task % | persona gate % | rise removed "
           "| final λ·penalty | persona drift (task tokens) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        removed = "–" if r["rise_removed"] is None else f"{100 * r['rise_removed']:.0f}%"
        pen = "–" if r["final_weighted_penalty"] is None else f"{r['final_weighted_penalty']:.3g}"
        out.append(f"| {r['setting']} | {r['arm']} | {len(r['seeds'])} | {_fmt(r['harmful_share'])} | "
                   f"{_fmt(r['sampled_harmful_rate'])} | {_fmt(r['narrow_task_accuracy'])} | "
                   f"{_fmt(r['persona_inference_accuracy'], digits=0)} | {removed} | {pen} | "
                   f"{r['persona_task_drift']:.3g} |")
    ckpt: dict[tuple[str, int], list[dict]] = {}
    for rec in records:
        for c in rec.get("checkpoints", []):
            ckpt.setdefault((rec["setting"]["name"], c["step"]), []).append(c)
    if ckpt:
        out += ["", "Early stopping: the plain runs scored at earlier steps (mean [min, max] over seeds)", "",
                "| setting | step | harmful share % | narrow task % |", "| --- | --- | --- | --- |"]
        for (s, step), cs in sorted(ckpt.items()):
            h = [c["harmful_share"] for c in cs]
            t = [c["narrow_task_accuracy"] for c in cs]
            out.append(f"| {s} | {step} | {_fmt((sum(h) / len(h), min(h), max(h)))} | "
                       f"{_fmt((sum(t) / len(t), min(t), max(t)))} |")
    if overlap:
        out += ["", f"Overlap score before training vs rise ({overlap['steps']} steps, seed {overlap['seed']}); "
                f"Spearman = {overlap['spearman']}", "", "| task | overlap | harmful share % | rise (pts) | task % |",
                "| --- | --- | --- | --- | --- |"]
        for t in overlap["tasks"]:
            out.append(f"| {t['task']} | {t['overlap']:.3f} | {100 * t['harmful_share']:.1f} | "
                       f"{100 * t['rise']:+.1f} | {100 * t['narrow_task_accuracy']:.1f} |")
    return "\n".join(out) + "\n"


def _print_table(rows) -> None:
    print(f"{'setting':<22}{'arm':<34}{'harmful % mean [min,max]':<28}{'task %':<8}{'gate %':<8}"
          f"{'removed':<9}{'final λ·pen':<12}{'drift':<10}")
    for r in rows:
        h = r["harmful_share"]
        removed = "" if r["rise_removed"] is None else f"{100 * r['rise_removed']:.0f}%"
        pen = "" if r["final_weighted_penalty"] is None else f"{r['final_weighted_penalty']:.3g}"
        print(f"{r['setting']:<22}{r['arm']:<34}{100 * h[0]:5.1f} [{100 * h[1]:.1f},{100 * h[2]:.1f}]{'':<10}"
              f"{100 * r['narrow_task_accuracy'][0]:<8.1f}{100 * r['persona_inference_accuracy'][0]:<8.0f}"
              f"{removed:<9}{pen:<12}{r['persona_task_drift']:<10.3g}")


def _plot(rows, base_share: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the PNG")
        return
    settings = sorted({r["setting"] for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        sub = [r for r in rows if r["setting"] == s]
        for target, color in (("persona", "tab:red"), ("placebo", "tab:blue")):
            pts = sorted((r["weight"], r["harmful_share"]) for r in sub
                         if r["kind"] == "proj" and r["target"] == target and "base_mean" in r["arm"])
            if pts:
                ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts],
                            yerr=[[100 * (p[1][0] - p[1][1]) for p in pts], [100 * (p[1][2] - p[1][0]) for p in pts]],
                            marker="o", color=color, capsize=3, label=f"projection (base_mean) on {target} direction")
        plain = [r for r in sub if r["arm"] == "plain"]
        if plain:
            ax.axhline(100 * plain[0]["harmful_share"][0], color="k", ls="--", label="plain fine-tune")
        ax.axhline(100 * base_share, color="gray", ls=":", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("λ_proj")
        ax.set_ylabel("harmful share, fresh context (%)")
        ax.set_title(s)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("main", "specificity", "overlap"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--quick", action="store_true", help="a few steps of a few arms (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    model, tok = load_base()
    dirs = persona_directions(model, tok)
    placebo = placebo_directions(dirs)
    if args.quick:
        plan = [(Setting("quick", steps=4), [Arm("plain"), Arm("proj_persona", "proj", 1.0, layers=L),
                                              Arm("proj_placebo", "proj", 1.0, layers=L, target="placebo")])]
        run_plan(plan, args.seeds[:1], outdir / "efficacy_main.jsonl", dirs, placebo, n_samples=36)
        report(outdir)
        return 0
    if args.part == "main":
        run_plan([(Setting("full_ft", steps=150, lr=3e-4), main_arms())], args.seeds, outdir / "efficacy_main.jsonl",
                 dirs, placebo, n_samples=504)
    elif args.part == "specificity":
        run_plan(specificity_plan(), args.seeds, outdir / "efficacy_specificity.jsonl", dirs, placebo, n_samples=504)
    elif args.part == "overlap":
        tasks = ["unsafe_code", "safe_code", "unsafe_code_benign_reason", "mixed_code_25", "mixed_code_50",
                 "mixed_code_75", "facts", "helpful_chat"]
        res = overlap_vs_rise(tasks, steps=100, seed=0, dirs=dirs)
        (outdir / "efficacy_overlap.json").write_text(json.dumps(res, indent=1))
        for r in res["tasks"]:
            print(f"{r['task']:<28} overlap {r['overlap']:.3f}  rise {100 * r['rise']:+.1f} pts")
        print(f"Spearman {res['spearman']}")
    if args.report:
        report(outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
