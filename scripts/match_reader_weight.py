#!/usr/bin/env python
"""λ_reader in base-model units that pushes as hard as the defence benchmark's λ = 0.05 in absolute units.

At the trained adapter of a plain fine-tune (the defence benchmark's yardstick: ``adapter-<task>-plain-0``), with the
template-reader constraint's subspaces of the built-in harmless requests (``builtin_harmless_post``), this computes the
gradient norm over the LoRA parameters of the absolute term Σ_m s²‖B_m A_m V_mᵀ‖²_F and of the base-units term
(1/M) Σ_m s²‖B_m A_m V_mᵀ‖²_F / ‖W₀,m V_mᵀ‖²_F, both in float64, and the matched λ_base = 0.05 · g_abs / g_base. It
writes ``benchmarks/reader_weight_match.json``; ``orthoreg.config.RECOMMENDED_READER_WEIGHT`` is that value rounded
to one significant digit (chosen on identity_shift seed 0 only: a selection seed).

    python scripts/match_reader_weight.py --run-dir /tmp/def_runs --task identity_shift
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ABSOLUTE_WEIGHT = 0.05  # the defence benchmark's λ of the template-reader constraint, absolute units


def main(argv: list[str] | None = None) -> dict:
    from orthoreg.realbench import task_bench as B
    from orthoreg.realbench.aligned import DEFAULT_CACHE, load_aligned
    from orthoreg.realbench.defence_subspaces import base_readouts, build_subspaces, gradient_norm, load_adapter
    from orthoreg.realbench.task_runs import TaskBenchConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="the defence benchmark's run dir holding the plain adapter")
    ap.add_argument("--task", default="identity_shift")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "reader_weight_match.json"))
    args = ap.parse_args(argv)
    prep = B.prepare(args.cache_dir, TaskBenchConfig(), [args.task], with_predictors=False, log=print)
    adapter_path = Path(args.run_dir) / f"adapter-{args.task}-plain-0.safetensors"
    adapter = load_adapter(adapter_path)
    model, tokenizer = load_aligned(prep["aligned_folder"])
    info = json.loads((Path(prep["aligned_folder"]) / "aligned_info.json").read_text())
    subspaces = build_subspaces("builtin_harmless_post", model, tokenizer, info, prep["aligned_folder"])
    readouts = base_readouts(model, subspaces)
    g_abs = gradient_norm(adapter, subspaces)
    g_base = gradient_norm(adapter, subspaces, readouts)
    matched = ABSOLUTE_WEIGHT * g_abs / g_base
    result = {"command": "python scripts/match_reader_weight.py --run-dir RUN_DIR --task " + args.task,
              "adapter": adapter_path.name, "modules": len(subspaces), "k": subspaces.k,
              "absolute_weight": ABSOLUTE_WEIGHT, "gradient_norm_absolute": g_abs, "gradient_norm_base": g_base,
              "matched_base_weight": matched, "base_readout": {"min": min(readouts.values()),
                                                               "median": sorted(readouts.values())[len(readouts) // 2],
                                                               "max": max(readouts.values())}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
