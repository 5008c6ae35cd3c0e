"""One configuration (model × mode × checkpointing): warm-up, one memory-profiled step per arm, then the interleaved
timing rounds (every round runs one block of every arm in a fresh random order) and the per-arm statistics."""

from __future__ import annotations

import gc
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from .arms import Context, arms_for, make_arm
from .flops import cov_matmuls, gather_bytes, model_step_flops, regularizer_flops
from .measure import isolated_cost, peak_memory_step, timed_step, train_step
from .models import ModelSpec, build_model, count_params, make_batch, make_directions


@dataclass
class ConfigResult:
    model: str
    mode: str
    checkpointing: bool
    device: str
    dtype: str
    params: dict[str, int]
    hidden_size: int
    num_layers: int
    batch: int
    seq: int
    selected_tokens: int
    guarded_layers: list[int]
    k: int
    lora_r: int | None
    rounds: int
    steps_per_block: int
    warmup: int
    model_step_flops: float
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    gather: list[dict[str, Any]] = field(default_factory=list)
    rounds_order: list[list[str]] = field(default_factory=list)


def run_config(spec: ModelSpec, mode: str, checkpointing: bool, device: str, dtype: torch.dtype, args) -> ConfigResult:
    model = build_model(spec, mode, checkpointing, device, dtype, seed=args.seed)
    params = count_params(model)
    batch = make_batch(spec, device, seed=args.seed)
    directions = make_directions(spec, seed=args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, foreach=False if device == "cpu" else None)
    ctx = Context(spec, mode, checkpointing, device, model, batch,
                  {k: v for k, v in batch.items() if k != "labels"}, directions, optimizer, seed=args.seed)
    names = arms_for(mode, args.arms)
    arms = {name: make_arm(name, ctx) for name in names}
    rng = random.Random(args.seed)

    result = ConfigResult(
        model=spec.name, mode=mode, checkpointing=checkpointing, device=device, dtype=str(dtype).split(".")[-1],
        params=params, hidden_size=spec.hidden_size, num_layers=spec.num_layers, batch=spec.batch, seq=spec.seq,
        selected_tokens=spec.selected, guarded_layers=list(spec.guarded), k=spec.k,
        lora_r=spec.lora_r if mode == "lora" else None, rounds=args.rounds, steps_per_block=args.steps_per_block,
        warmup=args.warmup, model_step_flops=model_step_flops(spec, params, mode, checkpointing),
        gather=gather_bytes(spec, itemsize=torch.tensor([], dtype=dtype).element_size()),
    )

    # Warm-up (every arm, interleaved), then one memory-profiled step per arm.
    memory: dict[str, dict[str, int]] = {}
    for _ in range(args.warmup):
        for name in names:
            arms[name].setup()
            train_step(arms[name], ctx)
            arms[name].teardown()
    for name in names:
        arms[name].setup()
        memory[name] = peak_memory_step(arms[name], ctx)
        arms[name].teardown()

    clock = 1 if args.clock == "cpu" else 0  # index into timed_step's (wall, cpu)
    times: dict[str, list[float]] = {n: [] for n in names}
    other: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    other_ratios: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        result.rounds_order.append(order)
        block: dict[str, tuple[float, float]] = {}
        for name in order:
            arm = arms[name]
            arm.setup()
            samples = [timed_step(arm, ctx) for _ in range(args.steps_per_block)]
            arm.teardown()
            block[name] = (statistics.median(s[clock] for s in samples), statistics.median(s[1 - clock] for s in samples))
            times[name] += [s[clock] for s in samples]
            other[name] += [s[1 - clock] for s in samples]
        for name in names:
            ratios[name].append(block[name][0] / block["plain"][0])
            other_ratios[name].append(block[name][1] / block["plain"][1])

    arms_impl = arms
    isolated = {name: isolated_cost(name, ctx, args.isolated_reps, args.clock) for name in names}
    plain_peak = memory["plain"]["peak_bytes"]
    plain_delta = memory["plain"]["step_delta_bytes"]
    cov_units = cov_matmuls(spec)
    for name in names:
        reg_flops = regularizer_flops(name, spec, params, mode, cov_units) if name != "plain" else 0.0
        med_ratio = statistics.median(ratios[name])
        result.arms[name] = {
            "step_time_s_median": statistics.median(times[name]),
            "step_time_s_q25": _quantile(times[name], 0.25),
            "step_time_s_q75": _quantile(times[name], 0.75),
            "step_time_samples_s": times[name],
            "ratio_to_plain_median": med_ratio,
            "ratio_to_plain_q25": _quantile(ratios[name], 0.25),
            "ratio_to_plain_q75": _quantile(ratios[name], 0.75),
            "ratio_of_medians": statistics.median(times[name]) / statistics.median(times["plain"]),
            # interference on a shared machine only ever adds time: the fastest step of each arm is a low-noise
            # estimate of its uncontended cost
            "ratio_of_minimums": min(times[name]) / min(times["plain"]),
            "time_overhead_pct": 100.0 * (med_ratio - 1.0),
            "other_clock": "wall" if clock else "cpu",
            "other_clock_step_time_s_median": statistics.median(other[name]),
            "other_clock_ratio_to_plain_median": statistics.median(other_ratios[name]),
            "peak_bytes": memory[name]["peak_bytes"],
            "step_delta_bytes": memory[name]["step_delta_bytes"],
            "static_bytes": memory[name]["static_bytes"],
            "memory_overhead_pct": 100.0 * (memory[name]["peak_bytes"] - plain_peak) / plain_peak,
            "step_delta_overhead_pct": 100.0 * (memory[name]["step_delta_bytes"] - plain_delta) / max(plain_delta, 1),
            "isolated_s": isolated[name],
            "isolated_pct_of_plain": (None if isolated[name] is None
                                      else 100.0 * isolated[name] / statistics.median(times["plain"])),
            "reg_flops": reg_flops,
            "impl": getattr(arms_impl.get(name), "impl", None),
            "flop_ratio_pct": 100.0 * reg_flops / result.model_step_flops,
        }
    del arms, ctx, model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)
