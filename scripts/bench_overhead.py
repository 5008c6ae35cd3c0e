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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SCHEMA_VERSION = 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ configurations
@dataclass
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    batch: int
    seq: int
    guarded: list[int]
    lengths: list[int]  # real (non-padding) tokens per row; the rest is right padding
    k: int = 4
    lora_r: int = 16
    rope_theta: float = 10000.0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def selected(self) -> int:
        return sum(self.lengths)


def _lengths(batch: int, seq: int, fractions: list[float]) -> list[int]:
    return [max(2, int(round(seq * fractions[i % len(fractions)]))) for i in range(batch)]


def model_specs(quick: bool) -> dict[str, ModelSpec]:
    pad = [1.0, 1.0, 0.875, 0.75]  # some rows padded, so the token-selection path is exercised
    if quick:
        return {"tiny": ModelSpec("tiny", 32, 4, 4, 2, 64, 128, 2, 16, [0, 1, 2, 3], _lengths(2, 16, [1.0, 0.75]),
                                  k=2, lora_r=4)}
    return {
        "tiny": ModelSpec("tiny", 64, 6, 4, 2, 172, 512, 4, 64, [1, 2, 3, 4], _lengths(4, 64, pad), k=4, lora_r=8),
        # ≥ 30M parameters, d ≥ 512, ≥ 8 layers; N = selected tokens ≥ d so the covariance takes its d×d form
        # (the costlier of the two regimes relative to the model).
        "small": ModelSpec("small", 512, 8, 8, 8, 1376, 8192, 4, 192, [2, 3, 4, 5], _lengths(4, 192, pad),
                           k=4, lora_r=16),
        # Llama-3-8B shape (GPU mode only).
        "llama3-8b": ModelSpec("llama3-8b", 4096, 32, 32, 8, 14336, 128256, 2, 2048, [14, 15, 16, 17],
                               _lengths(2, 2048, [1.0, 0.875]), k=4, lora_r=16, rope_theta=500000.0),
    }


ARMS_FULL = ["plain", "cov", "proj_absolute", "proj_base_mean", "reader", "cov+proj", "kl"]
ARMS_LORA = ["plain", "cov", "proj_absolute", "proj_base_mean", "proj_paired", "lora_w", "reader", "cov+proj",
             "cov+proj_paired", "all", "kl"]
WEIGHT_ARMS = ("lora_w", "reader")
READER_K = 16  # rows of V_m per module (the reader arm)
READER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_ARMS = sorted(set(ARMS_FULL) | set(ARMS_LORA))


def arm_config(arm: str, guarded: list[int]):
    """The ``OrthoRegConfig`` of an arm (``None`` for plain/kl)."""
    from orthoreg.config import OrthoRegConfig

    table = {
        "cov": dict(cov_weight=1.0, proj_weight=0.0),
        "proj_absolute": dict(proj_weight=1.0, anchor="absolute"),
        "proj_base_mean": dict(proj_weight=1.0, anchor="base_mean"),
        "proj_paired": dict(proj_weight=1.0, anchor="paired"),
        "lora_w": dict(proj_weight=0.0, lora_weight=1.0),
        "reader": dict(proj_weight=0.0, reader_weight=1.0),
        "cov+proj": dict(cov_weight=1.0, proj_weight=1.0, anchor="base_mean"),
        "cov+proj_paired": dict(cov_weight=1.0, proj_weight=1.0, anchor="paired"),
        "all": dict(cov_weight=1.0, proj_weight=1.0, lora_weight=1.0, anchor="base_mean"),
    }
    if arm not in table:
        return None
    return OrthoRegConfig(layers=list(guarded), **table[arm])


# ------------------------------------------------------------------------------------------------ model and data
def build_model(spec: ModelSpec, mode: str, checkpointing: bool, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max(spec.seq, 64), rope_theta=spec.rope_theta, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # built in place in its dtype: the 8B shape never exists in float32
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.23
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
    model.train()
    return model


def make_batch(spec: ModelSpec, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, spec.vocab_size, (spec.batch, spec.seq), generator=g)
    mask = torch.zeros(spec.batch, spec.seq, dtype=torch.long)
    for row, n in enumerate(spec.lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def make_directions(spec: ModelSpec, seed: int = 0):
    from orthoreg.directions.harmful import HarmfulDirections

    g = torch.Generator().manual_seed(seed + 1)
    return HarmfulDirections({i: torch.randn(spec.k, spec.hidden_size, generator=g) for i in spec.guarded},
                             metadata={"source": "bench_overhead random directions"})


def make_input_subspaces(model, k: int = READER_K, seed: int = 0):
    """``InputSubspaces`` of k random orthonormal rows for every ``READER_MODULES`` linear module of every layer (the
    reader arm's V_m; module names as in the base model, so they fit it bare or PEFT-wrapped)."""
    from orthoreg.core.layers import in_width
    from orthoreg.reader.subspaces import InputSubspaces, named_input_modules

    g = torch.Generator().manual_seed(seed + 2)
    bases = {}
    for name, module in named_input_modules(model).items():
        if name.rsplit(".", 1)[-1] in READER_MODULES:
            d_in = in_width(module)
            bases[name] = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64)).Q.T.float()
    return InputSubspaces(bases, metadata={"source": "bench_overhead random orthonormal rows", "k": k})


def count_params(model) -> dict[str, int]:
    from orthoreg.core.capture import find_decoder_stack

    stack = find_decoder_stack(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embed = stack.lm.get_input_embeddings().weight.numel()
    return {"total": total, "trainable": trainable, "matmul": total - embed}


# ------------------------------------------------------------------------------------------------ arms
class Arm:
    """One variant of the training step. ``setup``/``teardown`` run outside the timed region."""

    def __init__(self, name: str, ctx: Context):
        self.name, self.ctx = name, ctx

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.ctx.model(**batch).loss


class OrthoFullArm(Arm):
    """Full fine-tuning: the ``OrthoRegCallback`` engine (``OrthoRegularizer``, inject mode)."""

    def __init__(self, name, ctx, config):
        super().__init__(name, ctx)
        from orthoreg.engine.regularizer import OrthoRegularizer

        self.reg = OrthoRegularizer(config, ctx.directions, mode="inject")
        if config.anchor == "base_mean" and config.proj_weight > 0:  # r recorded once, outside the timed steps
            self.reg.calibrate(ctx.model, [ctx.batch_no_labels])
            self.reg.detach()

    def setup(self):
        self.reg.attach(self.ctx.model)
        self.reg.grad_scale = 1.0

    def teardown(self):
        self.reg.detach()
        self.reg.pop_metrics()


class ReaderFullArm(Arm):
    """Full fine-tuning, reader term alone: ``ReaderPenalty`` in inject mode (what ``OrthoRegCallback`` builds for
    ``reader_weight > 0``). W₀V_mᵀ is recorded at the first attach, outside the timed steps, and kept across blocks."""

    def __init__(self, name, ctx, config):
        super().__init__(name, ctx)
        from orthoreg.reader.wiring import reader_penalty_for

        self.reader = reader_penalty_for(config, make_input_subspaces(ctx.model, seed=ctx.seed), mode="inject")

    def setup(self):
        self.reader.attach(self.ctx.model)
        self.reader.grad_scale = 1.0

    def teardown(self):
        self.reader.detach()
        self.reader.pop_metrics()


class OrthoLoRAArm(Arm):
    """LoRA: ``OrthoLoRA`` (activation terms in return mode + the in-module weight-space term)."""

    def __init__(self, name, ctx, config):
        super().__init__(name, ctx)
        self.config = config
        self.state = None
        self.wrapper = None
        self.subspaces = make_input_subspaces(ctx.model, seed=ctx.seed) if config.reader_weight > 0 else None
        if config.anchor == "base_mean" and config.proj_weight > 0:
            self.setup()
            self.wrapper.regularizer.calibrate(ctx.model, [ctx.batch_no_labels])
            self.state = self.wrapper.state_dict_orthoreg()
            self.teardown()

    def setup(self):

        from orthoreg.lora.wrapper import OrthoLoRA

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unguarded writers
            self.wrapper = OrthoLoRA(self.ctx.model, self.config, self.ctx.directions,
                                     input_subspaces=self.subspaces)
        if self.state is not None:
            self.wrapper.load_state_dict_orthoreg(self.state)
        self.wrapper.train()

    def teardown(self):
        self.wrapper.remove_hooks()
        self.wrapper.pop_metrics()
        self.wrapper = None

    def loss(self, batch):
        return self.wrapper(**batch).loss


class KLArm(Arm):
    """KL-to-base: task loss + β·KL(p_θ ‖ p_base) over the non-padding positions, the base logits from a frozen copy
    (full fine-tuning) or from the same model with its adapter disabled (LoRA), under no_grad.

    Uses the project's ``orthoreg.baselines.KLToBaseRegularizer`` (gradient hook on the logits) when it is
    importable, else an inline loss-based version (``impl`` says which).
    """

    beta = 0.1

    def __init__(self, name, ctx):
        super().__init__(name, ctx)
        self.ref = None
        if ctx.mode == "full":
            self.ref = copy.deepcopy(ctx.model).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        try:
            from orthoreg.baselines import KLToBaseRegularizer
        except ImportError:
            self.reg, self.impl = None, "inline"
        else:
            self.reg, self.impl = KLToBaseRegularizer(self.beta, reference_model=self.ref), "orthoreg.baselines"

    def setup(self):
        if self.reg is not None:
            self.reg.attach(self.ctx.model)

    def teardown(self):
        if self.reg is not None:
            self.reg.detach()
            self.reg.pop_metrics()

    def loss(self, batch):
        model = self.ctx.model
        if self.reg is not None:
            return model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            if self.ref is not None:
                ref_logits = self.ref(**inputs).logits
            else:
                with model.disable_adapter():
                    ref_logits = model(**inputs).logits
        out = model(**batch)
        keep = batch["attention_mask"].bool()
        logp = F.log_softmax(out.logits[keep].float(), dim=-1)
        logq = F.log_softmax(ref_logits[keep].float(), dim=-1)
        kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")  # Σ p_θ (log p_θ − log p_base) / N
        return out.loss + self.beta * kl


@dataclass
class Context:
    spec: ModelSpec
    mode: str
    checkpointing: bool
    device: str
    model: Any
    batch: dict
    batch_no_labels: dict
    directions: Any
    optimizer: Any
    seed: int = 0


def make_arm(name: str, ctx: Context) -> Arm:
    if name == "plain":
        return Arm(name, ctx)
    if name == "kl":
        return KLArm(name, ctx)
    config = arm_config(name, ctx.spec.guarded)
    if ctx.mode == "full" and config.reader_weight > 0:
        return ReaderFullArm(name, ctx, config)
    return (OrthoLoRAArm if ctx.mode == "lora" else OrthoFullArm)(name, ctx, config)


def arms_for(mode: str, selected: list[str] | None) -> list[str]:
    arms = ARMS_LORA if mode == "lora" else ARMS_FULL
    if selected:
        arms = [a for a in arms if a in selected or a == "plain"]
    return arms


# ------------------------------------------------------------------------------------------------ measurement
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
    activation terms through the engine's own ``_penalty`` (selection, both terms, metric accumulation, the
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
        from orthoreg.reader.penalty import full_reader_penalty, lora_reader_penalty, weight_times_basis

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


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


# ------------------------------------------------------------------------------------------------ analytic
def model_step_flops(spec: ModelSpec, params: dict[str, int], mode: str, checkpointing: bool) -> float:
    tokens = spec.tokens
    forward = 2.0 * params["matmul"] * tokens + 4.0 * spec.num_layers * spec.batch * spec.seq ** 2 * spec.hidden_size
    passes = 3.0 if mode == "full" else 2.0  # LoRA: no weight gradients for the frozen base
    if checkpointing:
        passes += 1.0  # recompute of the decoder layers (≈ the whole forward)
    return passes * forward


def regularizer_flops(arm: str, spec: ModelSpec, params: dict[str, int], mode: str, cov_units: float) -> float:
    """Matmul FLOPs (forward + backward) of an arm's extra work per step, as implemented."""
    n, d, k, r, L = spec.selected, spec.hidden_size, spec.k, spec.lora_r, len(spec.guarded)
    flops = 0.0
    if arm in ("cov", "cov+proj", "cov+proj_paired", "all"):
        flops += L * cov_units * 2.0 * n * d * min(n, d)
    if arm.startswith("proj") or arm in ("cov+proj", "cov+proj_paired", "all"):
        flops += L * 2 * 2.0 * n * d * k  # coords = X Uᵀ, and grad = E U
    if arm.endswith("paired"):
        per_layer = (params["matmul"] - spec.vocab_size * d) / spec.num_layers
        depth = max(spec.guarded) + 1
        flops += 2.0 * per_layer * depth * spec.tokens + 4.0 * depth * spec.batch * spec.seq ** 2 * d
        flops += L * 2.0 * n * d * k  # U x_ref
    if arm in ("lora_w", "all") and mode == "lora":
        i = spec.intermediate_size
        per_module = lambda fan_in: 3 * (2.0 * k * d * r + 2.0 * r * r * fan_in + 2.0 * k * r * r)  # noqa: E731
        flops += L * (per_module(d) + per_module(i))  # o_proj (in = d) and down_proj (in = intermediate)
    if arm == "reader":
        # Every READER_MODULES module of every layer, K = READER_K rows: (d_in, d_out) per module.
        i, K = spec.intermediate_size, READER_K
        kv = d * spec.num_kv_heads // spec.num_heads
        shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # q k v o gate up down
        if mode == "lora":
            # A Vᵀ (2·r·d_in·K) and B (AVᵀ) (2·d_out·r·K) forward; backward: ∂A (2·r·K·d_in), ∂B and ∂(AVᵀ)
            per_module = lambda d_in, d_out: 2 * (2.0 * r * d_in * K) + 3 * (2.0 * d_out * r * K)  # noqa: E731
        else:
            per_module = lambda d_in, d_out: 2 * (2.0 * d_out * d_in * K)  # noqa: E731  W Vᵀ forward, ∂W backward
        flops += spec.num_layers * sum(per_module(a, b) for a, b in shapes)
    if arm == "kl":
        flops += 2.0 * (params["matmul"] * spec.tokens + 2.0 * spec.num_layers * spec.batch * spec.seq ** 2 * d)
    return flops


def gather_bytes(spec: ModelSpec, itemsize: int = 4, world_sizes=(2, 8)) -> list[dict[str, Any]]:
    """Bytes each rank sends per micro-batch for ``gather=True`` (ring collectives), every rank holding N_max rows.

    Now (``orthoreg.terms.penalties.gather_rows(identical_loss=True)``): per guarded layer, an all-gather of one int64
    count and of the padded (N_max, d) rows in the model's dtype; backward sends nothing (every rank computes the
    same covariance, so each already holds the full gradient of its rows). Before: the rows in float32 and an
    all-reduce of the (W, N_max, d) float32 gradient in backward (2(W−1)/W · W·N_max·d·4 bytes). For comparison,
    an all-reduce of the sufficient statistics (Σx xᵀ, Σx, N in float32, forward and backward).
    """
    out = []
    d, L = spec.hidden_size, len(spec.guarded)
    n_max = spec.selected
    for w in world_sizes:
        counts = (w - 1) * 8
        rows = (w - 1) * n_max * d * itemsize
        before = counts + (w - 1) * n_max * d * 4 + 2 * (w - 1) * n_max * d * 4
        suffstats = 2 * (w - 1) / w * (d * d + d + 1) * 4
        out.append({
            "world_size": w, "n_max_rows": n_max, "row_itemsize": itemsize,
            "per_layer_forward_bytes": counts + rows, "per_layer_backward_bytes": 0,
            "per_microbatch_bytes": L * (counts + rows),
            "per_microbatch_bytes_before": L * before,
            "per_microbatch_bytes_suffstats_alternative": int(L * suffstats * 2),
        })
    return out


def analytic_params(spec: ModelSpec, mode: str) -> dict[str, int]:
    """Parameter counts of the Llama-shaped ``spec`` without building it (untied embeddings, no biases)."""
    d, i, L, v = spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size
    kv = d * spec.num_kv_heads // spec.num_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d  # q, o, k, v, gate/up/down, two norms
    total = L * per_layer + 2 * v * d + d
    lora = 0
    if mode == "lora":
        shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]  # q k v o gate up down (in, out)
        lora = L * sum(spec.lora_r * (a + b) for a, b in shapes)
    return {"total": total + lora, "trainable": lora if mode == "lora" else total, "matmul": total + lora - v * d}


def analytic_report(spec: ModelSpec, modes: list[str], ckpts: list[bool]) -> list[dict[str, Any]]:
    """FLOP ratios and gather bytes of every arm for ``spec``, computed without running anything."""
    rows = []
    for mode in modes:
        params = analytic_params(spec, mode)
        for ckpt in ckpts:
            step = model_step_flops(spec, params, mode, ckpt)
            arms = {a: 100.0 * regularizer_flops(a, spec, params, mode, _cov_matmuls(spec)) / step
                    for a in arms_for(mode, None) if a != "plain"}
            rows.append({"model": spec.name, "mode": mode, "checkpointing": ckpt, "params": params,
                         "model_step_flops": step, "flop_ratio_pct": arms,
                         "gather": gather_bytes(spec, itemsize=2 if spec.name == "llama3-8b" else 4)})
    return rows


# ------------------------------------------------------------------------------------------------ one configuration
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
    cov_units = _cov_matmuls(spec)
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


def _cov_matmuls(spec: ModelSpec) -> float:
    """(N, d)·(d, min(N, d)) products per covariance evaluation (forward + backward) in the installed orthoreg:
    3 with autograd's generic matmul backward; 1 + 1 with the closed-form backward; less with a symmetric forward."""
    from orthoreg.terms import covariance

    forward = float(getattr(covariance, "COV_FORWARD_MATMULS", 1.0))
    if forward < 1.0 and min(spec.selected, spec.hidden_size) < 512:  # fewer blocks at small sizes
        forward = 0.75 if min(spec.selected, spec.hidden_size) >= 256 else 1.0
    return forward + float(getattr(covariance, "COV_BACKWARD_MATMULS", 2))


# ------------------------------------------------------------------------------------------------ RSS (subprocess)
def _read_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def rss_child(payload: str) -> None:
    """Runs one arm of one configuration in this (fresh) process and prints its peak RSS as JSON."""
    job = json.loads(payload)
    torch.set_num_threads(job["threads"])
    spec = ModelSpec(**job["spec"])
    model = build_model(spec, job["mode"], job["checkpointing"], "cpu", torch.float32, seed=job["seed"])
    batch = make_batch(spec, "cpu", seed=job["seed"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, foreach=False)
    ctx = Context(spec, job["mode"], job["checkpointing"], "cpu", model, batch,
                  {k: v for k, v in batch.items() if k != "labels"}, make_directions(spec, job["seed"]), optimizer,
                  seed=job["seed"])
    arm = make_arm(job["arm"], ctx)
    arm.setup()
    for _ in range(2):
        train_step(arm, ctx)
    rss_before = _read_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    train_step(arm, ctx)
    print(json.dumps({"vmhwm_bytes": _read_status("VmHWM"), "rss_before_bytes": rss_before, "hwm_reset": reset}))


def run_rss(spec: ModelSpec, mode: str, checkpointing: bool, names: list[str], args) -> dict[str, dict[str, int]]:
    out = {}
    for name in names:
        job = dict(spec=asdict(spec), mode=mode, checkpointing=checkpointing, arm=name, seed=args.seed,
                   threads=args.threads)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_rss-child", json.dumps(job)],
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------------ report
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


def _loadavg() -> list[str] | None:
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


# ------------------------------------------------------------------------------------------------ main
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
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as handle:
                json.dump({"schema_version": SCHEMA_VERSION, "analytic_only": True, "rows": rows}, handle, indent=1)
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
    load_start = _loadavg()
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
    report["machine"]["loadavg_start"], report["machine"]["loadavg_end"] = load_start, _loadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print("\n" + format_weight_terms(report["weight_terms"]))
    print("\nTargets:")
    for t in report["targets"]:
        print(f"  {t['model']} {t['mode']} ckpt={'on' if t['checkpointing'] else 'off'} {t['arm']} "
              f"{t['metric']}: {t['value_pct']:+.2f}% (≤ {t['limit_pct']}%) {'MET' if t['met'] else 'MISSED'}")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
