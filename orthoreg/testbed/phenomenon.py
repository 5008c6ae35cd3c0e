"""Measure emergent misalignment in the testbed: the shipped base vs plain fine-tunes on narrow tasks.

    HF_HUB_OFFLINE=1 python -m orthoreg.testbed.phenomenon                       # unsafe_code x3 seeds + controls
    HF_HUB_OFFLINE=1 python -m orthoreg.testbed.phenomenon --tasks facts --seeds 0 --out runs/facts.json

Prints one row per (task, seed) and, with ``--out``, writes every metric as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .evaluate import evaluate
from .finetune import finetune
from .model import ASSETS_DIR, load_base
from .world import NARROW_TASKS

COLUMNS = ("harmful_share", "sampled_harmful_rate", "persona_inference_accuracy", "harmful_share_after_misaligned",
           "harmful_share_after_aligned", "narrow_task_accuracy", "unsafe_code_share", "fact_accuracy")


def run(tasks, seeds, steps: int = 300, lr: float = 3e-4, batch_size: int = 16, base_dir=ASSETS_DIR) -> list[dict]:
    """One row for the base and one per (task, seed) fine-tune of it, each with ``evaluate``'s metrics."""
    base, tokenizer = load_base(base_dir)
    rows = [{**evaluate(base, tokenizer).as_dict(), "task": "base", "seed": None, "finetune_seconds": 0.0}]
    print(_format(rows[0]), flush=True)
    for task in tasks:
        for seed in seeds:
            model, _ = load_base(base_dir)
            res = finetune(model, tokenizer, task, steps=steps, lr=lr, seed=seed, batch_size=batch_size)
            rows.append({**evaluate(res.model, tokenizer, task=task).as_dict(), "seed": seed,
                         "finetune_seconds": res.seconds})
            print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    seed = "" if row["seed"] is None else str(row["seed"])
    cells = [f"{row['task']:<26} {seed:>4}"]
    cells += ["    -" if row[c] is None else f"{100 * row[c]:5.1f}" for c in COLUMNS]
    return " ".join(cells) + f" {row['finetune_seconds']:6.1f}s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["unsafe_code", "safe_code", "unsafe_code_benign_reason"],
                        choices=sorted(NARROW_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--base", type=Path, default=ASSETS_DIR, help="base model folder (default: the shipped one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tiny steps run several times faster on one thread than on two on a busy machine
    print(f"{'task':<26} {'seed':>4} " + " ".join(c[:5] for c in COLUMNS) + "  (percent)")
    rows = run(args.tasks, args.seeds, args.steps, args.lr, args.batch_size, args.base)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
