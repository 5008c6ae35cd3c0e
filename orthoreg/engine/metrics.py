"""The one metric vocabulary of orthoreg: what ``OrthoRegCallback`` logs and ``OrthoLoRA.pop_metrics()`` returns.

| key | value |
| --- | --- |
| ``orthoreg/cov`` | Σ_ℓ cov(h_ℓ), unweighted, mean over the micro-batches since the last log |
| ``orthoreg/proj`` | Σ_ℓ proj(h_ℓ), unweighted (in the anchor's units) |
| ``orthoreg/lora`` | Σ_m s²‖(U_ℓ B_m) A_m‖²_F over the weight-penalised LoRA writers, unweighted (``OrthoLoRA``) |
| ``orthoreg/anchor_kl`` | the anchor KL (``orthoreg.anchor``), unweighted, mean over its anchor batches since the last log |
| ``orthoreg/total`` | the weighted penalty that entered the loss: w(t)·(λ_cov·cov + λ_proj·proj + λ_lora·lora + λ_reader·reader) + λ_anchor·anchor_kl |
| ``orthoreg/warmup`` | w(t), the warm-up factor of the step the values come from |
| ``orthoreg/skipped`` | micro-batches whose penalty was dropped as non-finite (``on_nonfinite="skip"``), a count |
| ``orthoreg/<term>/layer_<i>`` | one guarded layer's term (``per_layer_metrics=True``) |
| ``orthoreg/harm_margin`` | refusal margin on the probe's harmful requests, nats: mean over them of logsumexp_{t∈R} log p(t|x) − logsumexp_{t∈C} log p(t|x) at the first reply token (R, C: the base model's refusal and compliance openers; ``HarmSignalCallback``); falls as safety erodes |
| ``orthoreg/harm_margin_delta`` | ``harm_margin`` minus its base value (recorded before the first update; 0 until the weights move) |
| ``orthoreg/overrefusal_margin`` | the same margin on the harmless partners of the probe's requests; rises with over-refusal |
| ``orthoreg/overrefusal_margin_delta`` | ``overrefusal_margin`` minus its base value |
| ``orthoreg/harm_fall`` | −``harm_margin_delta``, the fall the harm-margin guard acts on (``MarginGuardCallback``), nats |
| ``orthoreg/guard_alerts`` | crossings of ``harm_fall`` over the guard's ``max_fall`` since the last log, a count |
| ``orthoreg/guard_weight`` | the guard's budget mode: λ of the adapted term in force from the next step |

Under data parallelism the callback averages each value over the ranks (``skipped`` is summed) and the Trainer logs
it once, from rank 0; ``OrthoLoRA`` returns this rank's values (average them with ``accelerator.reduce``). The
``harm_margin`` family (``orthoreg.engine.refusal_margin``) is measured on every rank and logged from rank 0, not
averaged; it is the latest reading since the last log (every ``every_n_steps`` steps), not a mean.
"""

from __future__ import annotations

import torch

__all__ = [
    "GUARD_ALERTS",
    "GUARD_WEIGHT",
    "HARM_FALL",
    "HARM_MARGIN",
    "HARM_MARGIN_DELTA",
    "HARM_SIGNAL_METRICS",
    "METRIC_PREFIX",
    "OVERREFUSAL_MARGIN",
    "OVERREFUSAL_MARGIN_DELTA",
    "PenaltyMetrics",
    "metric_names",
]

METRIC_PREFIX = "orthoreg/"
# The live harm signal (orthoreg.engine.refusal_margin), unprefixed like the penalty names.
HARM_MARGIN = "harm_margin"
HARM_MARGIN_DELTA = "harm_margin_delta"
OVERREFUSAL_MARGIN = "overrefusal_margin"
OVERREFUSAL_MARGIN_DELTA = "overrefusal_margin_delta"
HARM_SIGNAL_METRICS = (HARM_MARGIN, HARM_MARGIN_DELTA, OVERREFUSAL_MARGIN, OVERREFUSAL_MARGIN_DELTA)
# The harm-margin guard (orthoreg.firewall.margin_guard), read with the harm signal.
HARM_FALL = "harm_fall"
GUARD_ALERTS = "guard_alerts"
GUARD_WEIGHT = "guard_weight"


def metric_names(values: dict[str, float], warmup: float | None = None) -> dict[str, float]:
    """``values`` keyed by the vocabulary above (``"proj"`` → ``"orthoreg/proj"``), with ``orthoreg/warmup``."""
    named = {METRIC_PREFIX + name: value for name, value in values.items()}
    if warmup is not None and values:
        named[METRIC_PREFIX + "warmup"] = warmup
    return named


class PenaltyMetrics:
    """Running sums of a regulariser's per-micro-batch values, kept as device tensors so the training path never
    waits for the device; they become floats only when read (one transfer)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | int = 0

    def add(self, values: dict[str, torch.Tensor], weighted_total: torch.Tensor,
            keep: torch.Tensor | float = 1.0) -> None:
        """One micro-batch: per-layer ``values`` (``"<term>/layer_i"``), their per-term sums, and the weighted
        ``total``. ``keep`` is 0 for a micro-batch whose penalty was dropped as non-finite: it does not count."""
        totals: dict[str, torch.Tensor] = {"total": weighted_total}
        for name, value in values.items():
            kind = name.split("/")[0]
            totals[kind] = totals[kind] + value if kind in totals else value
        totals.update(values)
        for name, value in totals.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count = self.count + keep

    def pop(self, per_layer: bool) -> dict[str, float]:
        """Means since the last pop, as floats (one host transfer), then resets."""
        names = [n for n in self.sums if per_layer or "/layer_" not in n]
        count = float(self.count)
        out: dict[str, float] = {}
        if names and count > 0:
            sums = torch.stack([self.sums[n].float().reshape(()) for n in names]).tolist()
            out = {name: value / count for name, value in zip(names, sums, strict=True)}
        self.reset()
        return out

    def pop_tensors(self) -> dict[str, torch.Tensor]:
        """Means since the last pop as 0-dim tensors (no host sync), then resets."""
        count, sums = self.count, self.sums
        self.reset()
        if isinstance(count, (int, float)) and count == 0:
            return {}
        denominator = count.clamp_min(1.0) if isinstance(count, torch.Tensor) else count
        return {name: value / denominator for name, value in sums.items()}
