"""Measure emergent misalignment in the testbed: the shipped base vs plain fine-tunes on narrow tasks.

    HF_HUB_OFFLINE=1 python -m orthoreg.testbed.phenomenon                       # unsafe_code x3 seeds + controls
    HF_HUB_OFFLINE=1 python -m orthoreg.testbed.phenomenon --tasks facts --seeds 0 --out runs/facts.json
    HF_HUB_OFFLINE=1 python -m orthoreg.testbed.phenomenon --lora-rank 8 --lr 1e-3 --tasks unsafe_code safe_code
    HF_HUB_OFFLINE=1 python -m orthoreg.testbed.phenomenon --tasks unsafe_code:0.9,safe_code:0.1 --probe-steps 5 10 20

A task is a name from ``NARROW_TASKS`` or an ad-hoc mix ``kind:weight,kind:weight`` of episode kinds.
``--probe-steps`` also evaluates (harmful share, narrow-task accuracy) at those steps during fine-tuning.

Prints one row per (task, seed) and, with ``--out``, writes every metric as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from .evaluate import evaluate
from .finetune import finetune
from .model import ASSETS_DIR, load_base
from .world import NarrowTask, get_task

COLUMNS = ("harmful_share", "sampled_harmful_rate", "persona_inference_accuracy", "harmful_share_after_misaligned",
           "harmful_share_after_aligned", "narrow_task_accuracy", "unsafe_code_share", "fact_accuracy")


def parse_task(spec: str) -> NarrowTask:
    """A task name, or ``kind:weight,kind:weight`` (weights summing to 1) for an ad-hoc mix of episode kinds."""
    if ":" not in spec:
        return get_task(spec)
    mix = tuple((kind, float(w)) for kind, w in (part.split(":") for part in spec.split(",")))
    return NarrowTask(spec, mix, "ad-hoc mix from the command line")


class EvalProbe(TrainerCallback):
    """Records the harmful share and narrow-task accuracy after the given optimizer steps."""

    def __init__(self, tokenizer, task: NarrowTask, steps):
        self.tokenizer, self.task, self.steps, self.records = tokenizer, task, set(steps), []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            m = evaluate(model, self.tokenizer, task=self.task, n_samples=1)  # evaluate restores train mode
            self.records.append({"step": state.global_step, "harmful_share": m.harmful_share,
                                 "narrow_task_accuracy": m.narrow_task_accuracy})


def run(tasks, seeds, steps: int = 300, lr: float = 3e-4, batch_size: int = 16, base_dir=ASSETS_DIR,
        lora_rank: int | None = None, probe_steps=()) -> list[dict]:
    """One row for the base and one per (task, seed) fine-tune of it, each with ``evaluate``'s metrics.

    ``lora_rank``: fine-tune a LoRA adapter of that rank (alpha = 2 * rank) on every linear
    projection instead of all weights. ``probe_steps``: also record ``EvalProbe`` values in ``probes``."""
    lora = None
    if lora_rank:
        from peft import LoraConfig

        lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base, tokenizer = load_base(base_dir)
    rows = [{**evaluate(base, tokenizer).as_dict(), "task": "base", "seed": None, "finetune_seconds": 0.0}]
    print(_format(rows[0]), flush=True)
    for task in map(parse_task, tasks):
        for seed in seeds:
            model, _ = load_base(base_dir)
            probe = EvalProbe(tokenizer, task, probe_steps)
            res = finetune(model, tokenizer, task, steps=steps, lr=lr, seed=seed, batch_size=batch_size, lora=lora,
                           callbacks=[probe] if probe_steps else ())
            rows.append({**evaluate(res.model, tokenizer, task=task).as_dict(), "seed": seed,
                         "finetune_seconds": res.seconds, "probes": probe.records})
            print(_format(rows[-1]), flush=True)
            for rec in probe.records:
                print(f"    step {rec['step']:>4}: harmful_share {100 * rec['harmful_share']:5.1f}  "
                      f"narrow_task_accuracy {100 * rec['narrow_task_accuracy']:5.1f}")
    return rows


def _format(row: dict) -> str:
    seed = "" if row["seed"] is None else str(row["seed"])
    cells = [f"{row['task']:<26} {seed:>4}"]
    cells += ["    -" if row[c] is None else f"{100 * row[c]:5.1f}" for c in COLUMNS]
    return " ".join(cells) + f" {row['finetune_seconds']:6.1f}s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["unsafe_code", "safe_code", "unsafe_code_benign_reason"],
                        help="task names or kind:weight,... mixes")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, help="LoRA on every linear projection instead of full fine-tuning")
    parser.add_argument("--probe-steps", nargs="*", type=int, default=[], help="also evaluate at these steps")
    parser.add_argument("--base", type=Path, default=ASSETS_DIR, help="base model folder (default: the shipped one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for spec in args.tasks:
        parse_task(spec)  # fail on a bad task before any training
    torch.set_num_threads(1)  # the tiny steps run several times faster on one thread than on two on a busy machine
    print(f"{'task':<26} {'seed':>4} " + " ".join(c[:5] for c in COLUMNS) + "  (percent)")
    rows = run(args.tasks, args.seeds, args.steps, args.lr, args.batch_size, args.base, args.lora_rank,
               args.probe_steps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
