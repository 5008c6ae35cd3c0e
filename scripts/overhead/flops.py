"""The analytic side: matmul FLOPs of a model step and of each arm's extra work, the bytes ``gather=True`` sends, and
parameter counts of a spec that is never built (``--analytic-only``)."""

from __future__ import annotations

from typing import Any

from .arms import arms_for
from .models import READER_K, ModelSpec


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


def cov_matmuls(spec: ModelSpec) -> float:
    """(N, d)·(d, min(N, d)) products per covariance evaluation (forward + backward) in the installed orthoreg:
    3 with autograd's generic matmul backward; 1 + 1 with the closed-form backward; less with a symmetric forward."""
    from orthoreg.terms import covariance

    forward = float(getattr(covariance, "COV_FORWARD_MATMULS", 1.0))
    if forward < 1.0 and min(spec.selected, spec.hidden_size) < 512:  # fewer blocks at small sizes
        forward = 0.75 if min(spec.selected, spec.hidden_size) >= 256 else 1.0
    return forward + float(getattr(covariance, "COV_BACKWARD_MATMULS", 2))


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
            arms = {a: 100.0 * regularizer_flops(a, spec, params, mode, cov_matmuls(spec)) / step
                    for a in arms_for(mode, None) if a != "plain"}
            rows.append({"model": spec.name, "mode": mode, "checkpointing": ckpt, "params": params,
                         "model_step_flops": step, "flop_ratio_pct": arms,
                         "gather": gather_bytes(spec, itemsize=2 if spec.name == "llama3-8b" else 4)})
    return rows
