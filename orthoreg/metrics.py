"""The one metric vocabulary of orthoreg: what ``OrthoRegCallback`` logs and ``OrthoLoRA.pop_metrics()`` returns.

| key | value |
| --- | --- |
| ``orthoreg/cov`` | Σ_ℓ cov(h_ℓ), unweighted, mean over the micro-batches since the last log |
| ``orthoreg/proj`` | Σ_ℓ proj(h_ℓ), unweighted (in the anchor's units) |
| ``orthoreg/lora`` | Σ_m s²‖(U_ℓ B_m) A_m‖²_F over the weight-penalised LoRA writers, unweighted (``OrthoLoRA``) |
| ``orthoreg/total`` | the weighted penalty that entered the loss: w(t)·(λ_cov·cov + λ_proj·proj + λ_lora·lora) |
| ``orthoreg/warmup`` | w(t), the warm-up factor of the step the values come from |
| ``orthoreg/skipped`` | micro-batches whose penalty was dropped as non-finite (``on_nonfinite="skip"``), a count |
| ``orthoreg/<term>/layer_<i>`` | one guarded layer's term (``per_layer_metrics=True``) |

Under data parallelism the callback averages each value over the ranks (``skipped`` is summed) and the Trainer logs
it once, from rank 0; ``OrthoLoRA`` returns this rank's values (average them with ``accelerator.reduce``).
"""

from __future__ import annotations

__all__ = ["METRIC_PREFIX", "metric_names"]

METRIC_PREFIX = "orthoreg/"


def metric_names(values: dict[str, float], warmup: float | None = None) -> dict[str, float]:
    """``values`` keyed by the vocabulary above (``"proj"`` → ``"orthoreg/proj"``), with ``orthoreg/warmup``."""
    named = {METRIC_PREFIX + name: value for name, value in values.items()}
    if warmup is not None and values:
        named[METRIC_PREFIX + "warmup"] = warmup
    return named
