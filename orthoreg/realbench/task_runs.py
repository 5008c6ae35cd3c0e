"""One benign fine-tune per (task, seed) of the second aligned base, its evaluation, and the across-task statistics.

Every run: the same aligned base, a fresh LoRA adapter seeded by the run's seed (r = 16, all projections), the
task's training examples in a seed-shuffled order, ``steps`` × ``batch_size``, constant lr, bf16 autocast — issue
8's fine-tune settings, with a longer ``max_length`` for the prose tasks. No defence: the point is how much each
*task* erodes, and whether a score measured before training predicts it.

``rise`` = harmful-attempt share after − the aligned base's, pooled over the templated and natural held-out sets
(96 harmful requests), in points; per set too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.rank_correlation import average_ranks, spearman_rho
from .hyperparams import FinetuneHyperparams


@dataclass
class TaskBenchConfig(FinetuneHyperparams):
    """One task fine-tune and its evaluation (saved in the results JSON; part of the cached evaluations' keys).

    Fields: ``FinetuneHyperparams``' (their defaults: steps 50 × batch 8, lr 5e-4, LoRA r 16 / alpha 32,
    96-token examples for the prose tasks); ``data_seed`` (the tasks' examples and the held-out sets);
    ``eval_per_activity``, ``safety_tokens``, ``task_tokens`` (evaluation); ``predictor_examples``.
    """

    data_seed: int = 0
    eval_per_activity: int = 2  # templated held-out: 24 activities × 2 forms = 48 + 48
    safety_tokens: int = 32
    task_tokens: int = 40
    predictor_examples: int = 128  # training examples the predictors read (the start of the seed-0 order)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_task(base_folder: str, answers_path: str, task_name: str, seed: int, config: TaskBenchConfig,
             ppl_limit: float, threads: int | None = 1, base_loader: Any = None) -> dict[str, Any]:
    """Fine-tune the aligned base on one task with one seed; evaluate safety (three outcomes) and the task metric.
    ``base_loader`` (tests) returns (model, tokenizer) instead of loading ``base_folder``."""
    from .aligned import load_aligned
    from .finetune import HARM_SIGNAL_EVERY, add_lora, train_lora
    from .model import machine_record, set_threads
    from .task_eval import evaluate_safety, evaluate_task, safety_sets
    from .tasks import build_task, encode_task

    set_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer = base_loader() if base_loader is not None else load_aligned(base_folder)
    answers = json.loads(open(answers_path).read())
    task = build_task(task_name, answers, seed=config.data_seed)
    examples = encode_task(tokenizer, task, config.max_length)
    peft_model = add_lora(model, seed=seed, r=config.rank, alpha=config.alpha)
    report = train_lora(peft_model, tokenizer, examples, steps=config.steps, batch_size=config.batch_size,
                        lr=config.lr, seed=seed, harm_signal_every=HARM_SIGNAL_EVERY)
    safety = evaluate_safety(peft_model, tokenizer, safety_sets(config.eval_per_activity, config.data_seed),
                             ppl_limit=ppl_limit, max_new_tokens=config.safety_tokens)
    task_result = evaluate_task(peft_model, tokenizer, task, max_new_tokens=config.task_tokens)
    return {
        "task": task_name, "seed": seed, "safety": safety, "task_metric": task_result,
        "losses": report.losses, "cpu_per_step": report.cpu_per_step, "wall_per_step": report.wall_per_step,
        "train_seconds": report.wall_total, "total_seconds": time.perf_counter() - t0,
        "harm_signal": report.harm_signal, "machine": machine_record(),
    }


# ----------------------------------------------------------------------------------------------- statistics


rankdata = average_ranks  # average ranks, ties shared (orthoreg.core.rank_correlation)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); nan when either side is constant."""
    rho = spearman_rho(x, y)
    return math.nan if rho is None else rho


def bootstrap_spearman(predictor: Sequence[float], rises: Sequence[Sequence[float]], n_boot: int = 2000,
                       seed: int = 0) -> dict[str, float]:
    """ρ between a per-task predictor and the per-task mean rise, with a 95% percentile interval from a bootstrap
    that resamples tasks (with replacement) and, within each drawn task, its seeds (so the interval carries both
    the task sample and the seed noise). Resamples where a side is constant are dropped (their count is given)."""
    means = [statistics.fmean(r) for r in rises]
    rho = spearman(predictor, means)
    rng = random.Random(seed)
    draws, dropped = [], 0
    n = len(predictor)
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        xs = [predictor[i] for i in idx]
        ys = [statistics.fmean(rng.choice(rises[i]) for _ in rises[i]) for i in idx]
        value = spearman(xs, ys) if len(set(xs)) > 1 and len(set(ys)) > 1 else math.nan
        if math.isnan(value):
            dropped += 1
        else:
            draws.append(value)
    draws.sort()
    lo = draws[int(0.025 * len(draws))] if draws else math.nan
    hi = draws[min(len(draws) - 1, int(0.975 * len(draws)))] if draws else math.nan
    return {"spearman": rho, "ci95": [lo, hi], "n_boot": n_boot, "dropped": dropped}
