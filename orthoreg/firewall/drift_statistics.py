r"""The numbers behind ``DriftMonitor``: per-layer running sums, their reduction over ranks, the base statistics and
the drift reading (formulas: ``orthoreg.firewall.monitor``).

Per layer ℓ and step, with c = U_ℓ x (k,) the coordinates of a selected token x:
n = Σ 1, s1 = Σ c, s2 = Σ c² (float64 on the activations' device; float32 on MPS, which has no float64), and the
sum of the micro-batches' covariance penalties with their count. Calibration turns the totals into μ = s1/n,
σ = max(√(s2/n − μ²), min_std) and the mean covariance penalty; a reading is drift = (s1/n − μ)/σ and
Δcov = (mean cov − base cov)/base cov.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..terms.penalties import all_reduce_sum

logger = logging.getLogger("orthoreg.firewall.monitor")

__all__ = ["DriftReading", "LayerSums", "base_statistics", "drift_reading", "reduce_layer_sums"]


@dataclass
class DriftReading:
    """One step's drift (``DriftMonitor.update``).

    Attributes:
        step: the monitor's update count when it was taken (the optimizer step in a Trainer).
        drift: layer → signed drift per harmful direction, σ units.
        cov_change: layer → relative change of the covariance penalty from its base value (``track_covariance``).
        n_tokens: tokens the reading averages over (all ranks).
    """

    step: int
    drift: dict[int, list[float]]
    cov_change: dict[int, float] = field(default_factory=dict)
    n_tokens: int = 0

    def largest(self, side: str = "both") -> tuple[float, int | None, int | None]:
        """(value, layer, direction) of the largest drift: |drift| for ``side="both"``; for ``side="harmful"`` the
        largest positive drift (movement toward the harmful side), 0 when every drift is ≤ 0."""
        best, where = -math.inf, (None, None)
        for layer, values in self.drift.items():
            for j, value in enumerate(values):
                score = abs(value) if side == "both" else value
                if score > best:
                    best, where = score, (layer, j)
        if where[0] is None:
            return 0.0, None, None
        return max(best, 0.0), where[0], where[1]


@dataclass
class LayerSums:
    """Running sums of one layer over some micro-batches (tensors on the activations' device: no host sync)."""

    n: torch.Tensor
    s1: torch.Tensor  # (k,) Σ u_j·x
    s2: torch.Tensor  # (k,) Σ (u_j·x)²
    cov_sum: torch.Tensor
    cov_count: int = 0

    @classmethod
    def zeros(cls, k: int, device: torch.device) -> LayerSums:
        dtype = torch.float64 if device.type != "mps" else torch.float32
        zeros = torch.zeros(k, dtype=dtype, device=device)
        scalar = torch.zeros((), dtype=dtype, device=device)
        return cls(n=scalar.clone(), s1=zeros.clone(), s2=zeros.clone(), cov_sum=scalar.clone())

    def add(self, coords: torch.Tensor, covariance: torch.Tensor | None) -> None:
        """One micro-batch: ``coords`` (N, k) float64 token coordinates, and its covariance penalty (or ``None``)."""
        dtype = self.s1.dtype
        self.n += coords.shape[0]
        self.s1 += coords.sum(dim=0).to(dtype)
        self.s2 += coords.square().sum(dim=0).to(dtype)
        if covariance is not None:
            self.cov_sum += covariance.to(dtype)
            self.cov_count += 1


def reduce_layer_sums(layers: Sequence[int], widths: Mapping[int, int], sums: Mapping[int, LayerSums],
                      sync: bool) -> dict[int, dict[str, Any]]:
    """The step's sums per layer as Python floats (``n``, ``s1``, ``s2``, ``cov_sum``, ``cov_count``), summed over
    data-parallel ranks with ``sync`` (one all-reduce; every rank must call it, with or without sums of its own)."""
    if not sums and not sync:
        return {}
    parts, device = [], None
    for layer in layers:  # per layer: [n, s1 (k), s2 (k), cov_sum, cov_count]
        k = widths[layer]
        acc = sums.get(layer)
        if acc is None:
            parts.append(torch.zeros(2 * k + 3, dtype=torch.float64))
            continue
        device = acc.n.device
        parts.append(torch.cat([acc.n.reshape(1).double().cpu(), acc.s1.double().cpu(), acc.s2.double().cpu(),
                                acc.cov_sum.reshape(1).double().cpu(),
                                torch.tensor([float(acc.cov_count)], dtype=torch.float64)]))
    flat = torch.cat(parts)  # one device sync per step, at update time
    if sync:  # on this rank's own CUDA device under NCCL when the sums live there
        flat = all_reduce_sum(flat if device is None else flat.to(device)).cpu()
    values, out, at = flat.tolist(), {}, 0
    for layer in layers:
        k = widths[layer]
        row = values[at:at + 2 * k + 3]
        at += 2 * k + 3
        out[layer] = {"n": row[0], "s1": row[1:1 + k], "s2": row[1 + k:1 + 2 * k], "cov_sum": row[1 + 2 * k],
                      "cov_count": row[2 + 2 * k]}
    return out


def base_statistics(totals: Mapping[int, Mapping[str, Any]], batch_means: Mapping[int, Sequence[torch.Tensor]],
                    min_std: float) -> tuple[dict, dict, dict, dict, int] | None:
    """(μ, σ, base covariance, spread of the micro-batch means in σ units, tokens) per layer from the calibration's
    totals; ``None`` when calibration saw no tokens."""
    if not totals or all(t["n"] == 0 for t in totals.values()):
        return None
    mean, std, cov, spread = {}, {}, {}, {}
    for layer, t in totals.items():
        n = max(t["n"], 1.0)
        mu = [s / n for s in t["s1"]]
        var = [max(s2 / n - m * m, 0.0) for s2, m in zip(t["s2"], mu, strict=True)]
        sd = [max(math.sqrt(v), min_std) for v in var]
        if any(math.sqrt(v) < min_std for v in var):
            logger.warning(f"orthoreg firewall: the base model does not vary along a harmful direction of layer "
                           f"{layer}; its drift is measured against a floor σ = {min_std:g}")
        mean[layer], std[layer] = mu, sd
        if t["cov_count"]:
            cov[layer] = t["cov_sum"] / t["cov_count"]
        means = batch_means.get(layer, [])
        if len(means) >= 2:
            stacked = torch.stack(list(means)).double()
            spread[layer] = (stacked.std(dim=0) / torch.tensor(sd, dtype=torch.float64)).tolist()
    return mean, std, cov, spread, int(next(iter(totals.values()))["n"])


def drift_reading(step: int, totals: Mapping[int, Mapping[str, Any]], base_mean: Mapping[int, list[float]],
                  base_std: Mapping[int, list[float]], base_cov: Mapping[int, float]) -> DriftReading | None:
    """The reading of one step's totals against the base statistics; ``None`` when nothing was observed."""
    if not totals or all(t["n"] == 0 for t in totals.values()):
        return None
    drift, cov_change = {}, {}
    for layer, t in totals.items():
        if t["n"] == 0:
            continue
        mu, sd = base_mean[layer], base_std[layer]
        drift[layer] = [(s / t["n"] - m) / s_ for s, m, s_ in zip(t["s1"], mu, sd, strict=True)]
        reference = base_cov.get(layer)
        if t["cov_count"] and reference:
            cov_change[layer] = (t["cov_sum"] / t["cov_count"] - reference) / reference
    return DriftReading(step=step, drift=drift, cov_change=cov_change,
                        n_tokens=int(max(t["n"] for t in totals.values())))
