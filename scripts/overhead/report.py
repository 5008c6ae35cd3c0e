"""The report: the printed tables, the Markdown of a saved report (``--markdown``), the targets, the weight-term
lines, the machine description and the JSON written to ``--out``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import torch

from .arms import WEIGHT_ARMS, KLArm
from .run import ConfigResult

SCHEMA_VERSION = 1
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:8.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(results: list[ConfigResult]) -> str:
    lines = []
    for res in results:
        clock = "wall" if next(iter(res.arms.values()), {}).get("other_clock") == "cpu" else "cpu"
        other = "cpu" if clock == "wall" else "wall"
        head = (f"{'arm':<16}{clock + ' s':>9}{'ratio':>8}{'IQR':>15}{'time %':>8}{other + ' r':>8}{'min r':>7}{'isol %':>8}{'FLOP %':>8}"
                f"{'peak MiB':>10}{'mem %':>7}{'Δstep MiB':>11}{'Δstep %':>9}")
        lines.append("")
        lines.append(
            f"== {res.model} ({res.params['total'] / 1e6:.1f}M params, d={res.hidden_size}, L={res.num_layers}) "
            f"{res.mode} ckpt={'on' if res.checkpointing else 'off'} {res.device}/{res.dtype} "
            f"B×T={res.batch}×{res.seq} N={res.selected_tokens} guarded={res.guarded_layers} k={res.k}"
            + (f" r={res.lora_r}" if res.lora_r else "") + f" rounds={res.rounds}"
        )
        lines.append(head)
        for name, a in res.arms.items():
            iqr = f"[{a['ratio_to_plain_q25']:.3f},{a['ratio_to_plain_q75']:.3f}]"
            rss = ""
            if "rss" in a:
                rss = f"  rss {a['rss']['vmhwm_bytes'] / 2 ** 20:.0f} MiB ({a['rss_overhead_pct']:+.1f}%)"
            lines.append(
                f"{name:<16}{a['step_time_s_median']:9.4f}{a['ratio_to_plain_median']:8.3f}{iqr:>15}"
                f"{a['time_overhead_pct']:+8.1f}{a['other_clock_ratio_to_plain_median']:8.3f}{a['ratio_of_minimums']:7.3f}{_pct(a['isolated_pct_of_plain']):>8}{a['flop_ratio_pct']:8.2f}{_mib(a['peak_bytes']):>10}"
                f"{a['memory_overhead_pct']:+7.1f}{_mib(a['step_delta_bytes']):>11}{a['step_delta_overhead_pct']:+9.1f}"
                + rss
            )
        g = res.gather
        lines.append("gather=True bytes sent per rank per micro-batch (ring): " + ", ".join(
            f"W={x['world_size']}: {x['per_microbatch_bytes'] / 2 ** 20:.1f} MiB"
            f" (before: {x.get('per_microbatch_bytes_before', float('nan')) / 2 ** 20:.1f})" for x in g))
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a report (``--markdown PATH``), as pasted into ``benchmarks/README.md``."""
    out = []
    for c in report["configs"]:
        out.append(f"\n**{c['model']}** ({c['params']['total'] / 1e6:.1f}M params, d={c['hidden_size']}, "
                   f"L={c['num_layers']}), {c['mode']}, checkpointing {'on' if c['checkpointing'] else 'off'}, "
                   f"B×T={c['batch']}×{c['seq']}, N={c['selected_tokens']}, guarded {c['guarded_layers']}, "
                   f"k={c['k']}" + (f", r={c['lora_r']}" if c["lora_r"] else "") + f", {c['rounds']} rounds\n")
        out.append("| arm | step s (median) | time overhead % (median ratio) | IQR of ratio | ratio of minimums "
                   "| isolated % | FLOP % | peak MiB | memory overhead % |")
        out.append("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for name, a in c["arms"].items():
            out.append(
                f"| {name} | {a['step_time_s_median']:.3f} | {a['time_overhead_pct']:+.1f} | "
                f"[{a['ratio_to_plain_q25']:.3f}, {a['ratio_to_plain_q75']:.3f}] | {a.get('ratio_of_minimums', float('nan')):.3f} | "
                f"{_pct(a['isolated_pct_of_plain'])} | {a['flop_ratio_pct']:.2f} | {a['peak_bytes'] / 2 ** 20:.1f} | "
                f"{a['memory_overhead_pct']:+.2f} |")
    return "\n".join(out)


TARGETS = [
    # (model, arm, metric, limit %); the reader's: "the weight terms cost ≤ 0.5 % step time"
    ("small", "cov+proj", "time_overhead_pct", 3.0),
    ("small", "cov+proj", "memory_overhead_pct", 3.0),
    ("small", "lora_w", "time_overhead_pct", 1.0),
    ("small", "lora_w", "memory_overhead_pct", 1.0),
    ("small", "reader", "time_overhead_pct", 0.5),
    ("llama3-8b", "cov+proj", "time_overhead_pct", 2.0),
    ("llama3-8b", "all", "time_overhead_pct", 2.0),
]


def weight_terms(results: list[ConfigResult]) -> list[dict[str, Any]]:
    """Per configuration, the weight-term arms' median per-round ratio to plain and its IQR (and the isolated cost)."""
    out = []
    for res in results:
        for arm in WEIGHT_ARMS:
            if arm in res.arms:
                a = res.arms[arm]
                out.append({"model": res.model, "mode": res.mode, "checkpointing": res.checkpointing, "arm": arm,
                            "ratio_to_plain_median": a["ratio_to_plain_median"],
                            "ratio_to_plain_iqr": [a["ratio_to_plain_q25"], a["ratio_to_plain_q75"]],
                            "time_overhead_pct": a["time_overhead_pct"],
                            "isolated_pct_of_plain": a["isolated_pct_of_plain"], "rounds": res.rounds})
    return out


def format_weight_terms(rows: list[dict[str, Any]]) -> str:
    lines = ["Weight terms (median per-round ratio to plain [IQR]; isolated % of plain):"]
    for w in rows:
        q25, q75 = w["ratio_to_plain_iqr"]
        lines.append(f"  {w['model']} {w['mode']} ckpt={'on' if w['checkpointing'] else 'off'} {w['arm']:<7} "
                     f"{w['ratio_to_plain_median']:.4f} [{q25:.4f}, {q75:.4f}]  isolated {_pct(w['isolated_pct_of_plain'])}")
    return "\n".join(lines)


def evaluate_targets(results: list[ConfigResult]) -> list[dict[str, Any]]:
    out = []
    for model, arm, metric, limit in TARGETS:
        for res in results:
            if res.model != model or arm not in res.arms:
                continue
            value = res.arms[arm][metric]
            out.append({"model": model, "mode": res.mode, "checkpointing": res.checkpointing, "arm": arm,
                        "metric": metric, "limit_pct": limit, "value_pct": value, "met": value <= limit})
    return out


def loadavg() -> list[str] | None:
    try:
        with open("/proc/loadavg") as handle:
            return handle.read().split()[:3]
    except OSError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for pkg in ("transformers", "peft"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git_commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip()
    except OSError:
        pass
    return info


def build_report(args, argv, started: _dt.datetime, load_start: list[str] | None, results: list[ConfigResult],
                 skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON report of a run: machine, settings (``args``; ``argv`` as given to ``main``, ``None`` for the command
    line), every configuration's result, the skipped ones, the targets and the weight-term lines."""
    report = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "orthoreg overhead (issue 5)",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "settings": {"device": args.device, "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
                     "steps_per_block": args.steps_per_block, "warmup": args.warmup, "quick": args.quick,
                     "seed": args.seed, "optimizer": "AdamW(lr=1e-6)", "kl_beta": KLArm.beta,
                     "memory_method": ("torch.cuda.max_memory_allocated over one step" if args.device == "cuda" else
                                       "live static bytes + peak of torch.profiler CPU allocator events over one step")
                                      + ("; VmHWM per arm in a fresh subprocess" if args.rss else ""),
                     "argv": sys.argv[1:] if argv is None else list(argv)},
        "configs": [asdict(r) for r in results],
        "skipped": skipped,
        "targets": evaluate_targets(results),
        "weight_terms": weight_terms(results),
    }
    report["machine"]["loadavg_start"], report["machine"]["loadavg_end"] = load_start, loadavg()
    return report


def write_json(path: str, data: dict[str, Any]) -> None:
    """Writes ``data`` to ``path`` (indent 1, the layout of the committed ``benchmarks/overhead_*.json``), creating
    its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
