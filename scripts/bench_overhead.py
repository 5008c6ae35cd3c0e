#!/usr/bin/env python
"""Overhead benchmark of orthoreg (issue 5): step time and peak memory of plain fine-tuning vs each orthoreg term,
their combination, and a KL-to-base baseline.

What is measured, per configuration (model × {full, LoRA} × activation checkpointing {off, on}):

- **step time**: one optimizer step (forward, loss, backward, ``optimizer.step()``, ``zero_grad``) of a custom loop,
  wall clock (CUDA-synchronised on GPU). Arms are *interleaved*: every round runs one block of steps of every arm,
  in a freshly shuffled order, on the same model in the same process, so slow phases of a shared machine hit all
  arms alike. Reported: the median step time of each arm, and the median over rounds of the per-round ratio
  ``arm / plain`` (the plain block of the same round), with its inter-quartile range.
- **peak memory**: CPU: the peak of live torch-allocated bytes during one step, from the allocator events of
  ``torch.profiler`` (``profile_memory=True``; exact and deterministic, unlike RSS), plus the bytes already live at
  the step's start (parameters, buffers, optimizer state, the KL baseline's frozen copy, the batch). GPU:
  ``torch.cuda.max_memory_allocated`` over one step. ``--rss`` additionally runs every arm in a fresh subprocess
  and reports its ``VmHWM`` (peak resident set; reset with ``/proc/self/clear_refs`` after the warm-up).
- **analytic FLOP ratio**: the regulariser's matmul FLOPs (forward + backward, as implemented) over the model
  step's matmul FLOPs (2·P_matmul·tokens + attention per forward; ×3 for full fine-tuning, ×2 for LoRA — frozen
  weights get no weight gradient — plus one forward with checkpointing; the classic estimate is 6·params·tokens).
- **bytes sent per rank for ``gather=True``**: analytic, ring collectives: per guarded layer per micro-batch the
  all-gather of the row counts and of the padded N_max×d float32 rows (forward) and the all-reduce of their
  gradient (backward).

Arms: ``plain``; ``cov``; ``proj_absolute``/``proj_base_mean``/``proj_paired`` (paired: LoRA only);
``lora_w`` (the weight-space term, LoRA only); ``reader`` (the reader-side weight term alone, ``orthoreg.reader.penalty``,
with ``READER_K`` = 16 random orthonormal input rows V_m per linear module of every layer — q, k, v, o, gate, up,
down: LoRA λ·Σ s²‖B(AV_mᵀ)‖², full fine-tuning λ·Σ ‖W_mV_mᵀ − W₀V_mᵀ‖²); ``cov+proj`` (base_mean anchor) and
``cov+proj_paired`` (LoRA); ``all`` (cov + proj + lora_w, LoRA); ``kl`` (KL(p_θ ‖ p_base) on the logits; full: a
frozen copy of the model, LoRA: the same model with the adapter disabled, both under no_grad). Full fine-tuning goes
through ``OrthoRegularizer`` in inject mode (the engine of ``OrthoRegCallback``; the reader arm through
``ReaderPenalty`` in inject mode, the callback's reader engine), LoRA through ``OrthoLoRA``
(``input_subspaces=`` for the reader arm). The printed ``Weight terms`` lines (and the JSON's ``weight_terms``)
give the ``lora_w`` and ``reader`` median per-round ratios with their IQR.

Usage::

    python scripts/bench_overhead.py                    # tiny + small model on CPU (minutes)
    python scripts/bench_overhead.py --quick            # seconds, for CI; writes benchmarks/overhead_quick.json
    python scripts/bench_overhead.py --device cuda      # Llama-3-8B-shaped model, random weights, LoRA, bf16

Output: a printed table and JSON (``--out``, default ``benchmarks/overhead_<device>[_quick].json``).

This file is the entry point (the flags, the order of the run); the parts live in ``scripts/overhead/``: ``models``
(specs, model, batch, random U_ℓ and V_m), ``arms`` (the step variants), ``measure`` (time and memory of one step,
the penalty math alone), ``run`` (one configuration's interleaved rounds), ``flops`` (the analytic FLOP and gather
model), ``rss`` (``--rss`` subprocesses) and ``report`` (tables, targets, JSON).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import warnings
from typing import Any

import torch

# scripts/overhead/, importable because Python puts this script's folder first on sys.path.
from overhead.arms import ALL_ARMS
from overhead.flops import analytic_report
from overhead.models import model_specs
from overhead.report import (
    REPO,
    SCHEMA_VERSION,
    build_report,
    format_markdown,
    format_table,
    format_weight_terms,
    loadavg,
    write_json,
)
from overhead.rss import rss_child, run_rss
from overhead.run import ConfigResult, run_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default=None, help="comma list (tiny,small | llama3-8b); default by device")
    p.add_argument("--modes", default=None, help="comma list of full,lora (default: both on CPU, lora on GPU)")
    p.add_argument("--ckpt", default="off,on", help="activation checkpointing settings: off,on")
    p.add_argument("--arms", default=None, help=f"comma list of arms (plain always runs); from {ALL_ARMS}")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; quick: 2)")
    p.add_argument("--steps-per-block", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="clock of the ratios: process CPU time (default on CPU: robust to other jobs on a shared "
                        "machine) or wall time (default on GPU, synchronised)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per arm (default 2; quick: 1)")
    p.add_argument("--isolated-reps", type=int, default=None,
                   help="repetitions of the isolated penalty timing (default 21; quick: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss", action="store_true", help="also measure VmHWM per arm in fresh subprocesses (CPU)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny model) for CI")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the tables of an existing report as Markdown")
    p.add_argument("--analytic-only", action="store_true",
                   help="print analytic FLOP ratios and gather bytes (no run; e.g. --models llama3-8b without a GPU)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/overhead_<device>[_quick].json)")
    p.add_argument("--_rss-child", dest="rss_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.arms = args.arms.split(",") if args.arms else None
    if args.arms:
        unknown = sorted(set(args.arms) - set(ALL_ARMS))
        if unknown:
            p.error(f"unknown arms {unknown}; choose from {ALL_ARMS}")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.isolated_reps is None:
        args.isolated_reps = 3 if args.quick else 21
    if args.clock is None:
        args.clock = "wall" if args.device == "cuda" else "cpu"
    if args.models is None:
        args.models = "tiny" if args.quick else ("llama3-8b" if args.device == "cuda" else "tiny,small")
    if args.modes is None:
        args.modes = "lora" if args.device == "cuda" else "full,lora"
    if args.out is None:
        suffix = "analytic" if args.analytic_only else f"{args.device}{'_quick' if args.quick else ''}"
        args.out = os.path.join(REPO, "benchmarks", f"overhead_{suffix}.json")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rss_child is not None:
        rss_child(args.rss_child)
        return {}
    if args.markdown:
        with open(args.markdown) as handle:
            print(format_markdown(json.load(handle)))
        return {}
    if args.analytic_only:
        specs = model_specs(False)
        rows = [r for name in args.models.split(",") for r in analytic_report(
            specs[name], args.modes.split(","), [{"off": False, "on": True}[c] for c in args.ckpt.split(",")])]
        for r in rows:
            print(f"{r['model']} {r['mode']} ckpt={'on' if r['checkpointing'] else 'off'} "
                  f"({r['params']['total'] / 1e9:.2f}B params): analytic FLOP % "
                  + ", ".join(f"{a} {v:.2f}" for a, v in r["flop_ratio_pct"].items())
                  + "; gather=True bytes/rank/micro-batch: "
                  + ", ".join(f"W={g['world_size']} {g['per_microbatch_bytes'] / 2 ** 20:.0f} MiB" for g in r["gather"]))
        if args.out:
            write_json(args.out, {"schema_version": SCHEMA_VERSION, "analytic_only": True, "rows": rows})
            print(f"wrote {args.out}")
        return {"rows": rows}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available; nothing to run", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    specs = model_specs(args.quick)
    models = args.models.split(",")
    for name in models:
        if name not in specs:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(specs)}")
    modes = args.modes.split(",")
    ckpts = [{"off": False, "on": True}[c] for c in args.ckpt.split(",")]
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = loadavg()
    results: list[ConfigResult] = []
    skipped: list[dict[str, Any]] = []
    for name in models:
        for mode in modes:
            for ckpt in ckpts:
                t0 = time.perf_counter()
                try:
                    res = run_config(specs[name], mode, ckpt, args.device, dtype, args)
                except torch.cuda.OutOfMemoryError as exc:  # e.g. the 8B shape without checkpointing
                    skipped.append({"model": name, "mode": mode, "checkpointing": ckpt, "reason": f"OOM: {exc}"[:300]})
                    print(f"\n== {name} {mode} ckpt={'on' if ckpt else 'off'}: out of memory, skipped", flush=True)
                    torch.cuda.empty_cache()
                    continue
                if args.rss and args.device == "cpu":
                    rss = run_rss(specs[name], mode, ckpt, list(res.arms), args)
                    base = rss["plain"]["vmhwm_bytes"]
                    for arm, value in rss.items():
                        res.arms[arm]["rss"] = value
                        res.arms[arm]["rss_overhead_pct"] = 100.0 * (value["vmhwm_bytes"] - base) / base
                results.append(res)
                print(format_table([res]), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
    report = build_report(args, argv, started, load_start, results, skipped)
    write_json(args.out, report)
    print("\n" + format_weight_terms(report["weight_terms"]))
    print("\nTargets:")
    for t in report["targets"]:
        print(f"  {t['model']} {t['mode']} ckpt={'on' if t['checkpointing'] else 'off'} {t['arm']} "
              f"{t['metric']}: {t['value_pct']:+.2f}% (≤ {t['limit_pct']}%) {'MET' if t['met'] else 'MISSED'}")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
