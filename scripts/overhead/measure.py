"""What one arm costs: the time of one step (wall and process CPU), its peak memory (GPU allocator, or the CPU
profiler's allocator events over the live static bytes) and the time of its penalty math alone."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

from .arms import Arm, Context, KLArm, arm_config
from .models import make_input_subspaces


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(arm: Arm, ctx: Context) -> None:
    loss = arm.loss(ctx.batch)
    loss.backward()
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)


def timed_step(arm: Arm, ctx: Context) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    _sync(ctx.device)
    wall, cpu = time.perf_counter(), time.process_time()
    train_step(arm, ctx)
    _sync(ctx.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _live_static_bytes(arm: Arm, ctx: Context) -> int:
    tensors = list(ctx.model.parameters()) + list(ctx.model.buffers()) + list(ctx.batch.values())
    for state in ctx.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for p in ctx.model.parameters():
        if p.grad is not None:
            tensors.append(p.grad)
    if isinstance(arm, KLArm) and arm.ref is not None:
        tensors += list(arm.ref.parameters()) + list(arm.ref.buffers())
    if ctx.directions is not None:
        tensors += list(ctx.directions.directions.values())
    reader = getattr(arm, "reader", None) or getattr(getattr(arm, "wrapper", None), "reader", None)
    if reader is not None:  # V_m, their device copies and (full fine-tuning) W₀V_mᵀ
        tensors += list(reader.subspaces.subspaces.values()) + reader.resident_tensors
    return _storage_bytes(tensors)


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Silences a file descriptor (the profiler's native start/stop lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_memory_step(arm: Arm, ctx: Context) -> dict[str, int]:
    """Peak bytes during one step: GPU allocator peak, or (CPU) the live static bytes + the profiler's peak delta."""
    if ctx.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        train_step(arm, ctx)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": int(peak), "step_delta_bytes": int(peak - start), "static_bytes": int(start)}
    from torch.profiler import ProfilerActivity, profile

    static = _live_static_bytes(arm, ctx)
    with _quiet_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(arm, ctx)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() != torch.profiler.DeviceType.CPU:
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return {"peak_bytes": static + peak, "step_delta_bytes": peak, "static_bytes": static}


def isolated_cost(name: str, ctx: Context, reps: int, clock: str) -> float | None:
    """Median seconds of the arm's penalty math alone (forward + backward on captured activations / LoRA weights).

    A low-noise complement to the end-to-end ratio: no model forward, nothing else on the clock. Covers the
    activation terms through the engine's ``penalty_for_activations`` (selection, both terms, metric accumulation, the
    finiteness check), the weight-space term through ``lora_weight_penalty`` on every penalised writer and the reader
    term through ``lora_reader_penalty`` / ``full_reader_penalty`` on every module with a V_m. ``None`` for arms with
    a second forward (paired, kl) and for plain.
    """
    from orthoreg.core.capture import find_decoder_stack
    from orthoreg.engine.regularizer import OrthoRegularizer

    config = arm_config(name, ctx.spec.guarded)
    if config is None or name.endswith("paired"):
        return None
    tick = time.process_time if clock == "cpu" else time.perf_counter
    work = []
    if config.cov_weight > 0 or config.proj_weight > 0:
        stack = find_decoder_stack(ctx.model)
        captured: dict[int, torch.Tensor] = {}
        hooks = [stack.layers[i].register_forward_hook(
            lambda m, a, out, i=i: captured.setdefault(i, (out[0] if isinstance(out, tuple) else out).detach()))
            for i in ctx.spec.guarded]
        try:
            with torch.no_grad():
                ctx.model(**ctx.batch_no_labels)
        finally:
            for h in hooks:
                h.remove()
        reg = OrthoRegularizer(config, ctx.directions, mode="return")
        reg.attach(ctx.model)
        reg.detach()
        reg.base_reference = {i: torch.zeros(ctx.spec.k, device=ctx.device) for i in ctx.spec.guarded}
        reg.calibration_batches_seen = config.calibration_batches
        mask = ctx.batch["attention_mask"].bool()

        def activation_terms():
            leaves = {i: h.clone().requires_grad_(True) for i, h in captured.items()}
            penalty = reg.penalty_for_activations(leaves, mask)
            penalty.backward()

        work.append(activation_terms)
    if config.lora_weight > 0 and ctx.mode == "lora":
        from orthoreg.lora.wrapper import find_residual_writers
        from orthoreg.terms.penalties import lora_weight_penalty

        writers = [w for w in find_residual_writers(ctx.model) if w.layer in ctx.spec.guarded]
        us = {i: ctx.directions[i].to(ctx.device) for i in ctx.spec.guarded}

        def weight_terms():
            total = None
            for w in writers:
                adapter = w.module.active_adapters[0]
                p = lora_weight_penalty(w.module.lora_A[adapter].weight, w.module.lora_B[adapter].weight,
                                        us[w.layer], w.module.scaling[adapter])
                total = p if total is None else total + p
            total.backward()

        work.append(weight_terms)
    if config.reader_weight > 0:
        from orthoreg.core.layers import is_conv1d
        from orthoreg.terms.reader import full_reader_penalty, lora_reader_penalty, weight_times_basis

        subspaces = make_input_subspaces(ctx.model, seed=ctx.seed)
        modules = subspaces.resolve(ctx.model)
        bases = {n: subspaces[n].to(ctx.device) for n in modules}
        if ctx.mode == "full":
            with torch.no_grad():
                base = {n: weight_times_basis(m.weight, bases[n], is_conv1d(m)) for n, m in modules.items()}

        def reader_terms():
            total = None
            for n, m in modules.items():
                if ctx.mode == "lora":
                    adapter = m.active_adapters[0]
                    p = lora_reader_penalty(m.lora_A[adapter].weight, m.lora_B[adapter].weight, bases[n],
                                            m.scaling[adapter])
                else:
                    p = full_reader_penalty(m.weight, bases[n], base[n], is_conv1d(m))
                total = p if total is None else total + p
            total.backward()

        work.append(reader_terms)
    if not work:
        return None
    samples = []
    for rep in range(reps + 1):
        _sync(ctx.device)
        start = tick()
        for fn in work:
            fn()
        _sync(ctx.device)
        if rep:  # the first is a warm-up
            samples.append(tick() - start)
    ctx.optimizer.zero_grad(set_to_none=True)  # the weight terms left gradients on the weights
    return statistics.median(samples)
