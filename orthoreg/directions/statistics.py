"""Streamed float64 statistics of pooled activations → per-layer harmful subspaces and their held-out separation.

The formulas of each method (``diff_means``, ``pca_diff``, ``class_means``) are in ``orthoreg.directions.extraction``'s module
docstring; this module holds the running sums and the linear algebra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.activations import PromptItem
from .harmful import DirectionsError

# An eigen/singular value below this fraction of the largest means the statistic spans fewer than k dimensions.
_RANK_RTOL = 1e-9
# A mean difference below this fraction of the mean activation norm is numerical noise, not a direction.
_GAP_RTOL = 1e-6


class LayerStats:
    """Running float64 sums for one layer. Holds O(d) numbers, plus d² for ``pca_diff`` and C·d for
    ``class_means``; never the activations themselves."""

    def __init__(self, d: int, device: torch.device, pca: bool, n_categories: int) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.sums = torch.zeros(2, d, **kw)  # row 0: Σ a over harmful prompts; row 1: over harmless prompts
        self.counts = torch.zeros(2, **kw)
        self.norm_sum = torch.zeros((), **kw)  # Σ ‖a‖ over all prompts, to judge when a mean gap is noise
        self.diff_m2 = torch.zeros(d, d, **kw) if pca else None  # Σ_i δ_i δ_iᵀ over pairs
        self.n_pairs = 0
        # Per-category sums: [0, c] over harmful prompts of category c, [1, c] over their harmless partners.
        self.cat_sums = torch.zeros(2, n_categories, d, **kw) if n_categories else None
        self.cat_counts = torch.zeros(2, n_categories, **kw) if n_categories else None

    def update(self, items: Sequence[PromptItem], a: torch.Tensor, paired_batch: bool) -> None:
        a = a.to(device=self.sums.device, dtype=torch.float64)
        side = torch.tensor([item.side for item in items], device=a.device)
        self.sums.index_add_(0, side, a)
        self.counts.index_add_(0, side, torch.ones_like(side, dtype=torch.float64))
        self.norm_sum += a.norm(dim=1).sum()
        if self.diff_m2 is not None and paired_batch:
            m = len(items) // 2  # paired batches hold harmful[i:i+m] then harmless[i:i+m]
            delta = a[:m] - a[m:]
            self.diff_m2 += delta.T @ delta
            self.n_pairs += m
        if self.cat_sums is not None:
            for s in (0, 1):
                rows = [r for r, item in enumerate(items) if item.side == s and item.category >= 0]
                if rows:
                    cats = torch.tensor([items[r].category for r in rows], device=a.device)
                    self.cat_sums[s].index_add_(0, cats, a[rows])
                    self.cat_counts[s].index_add_(0, cats, torch.ones_like(cats, dtype=torch.float64))

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)


def subspace_directions(stats: LayerStats, layer: int, method: str, k: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The (k, d) float64 directions of one layer and method-specific diagnostics."""
    mu_h, mu_b = stats.means
    gap = mu_h - mu_b
    gap_norm = gap.norm()
    scale = stats.norm_sum / stats.counts.sum()
    if gap_norm <= _GAP_RTOL * scale:
        raise DirectionsError(
            f"layer {layer}: harmful and harmless activations have the same mean (gap {gap_norm:.3g} vs activation "
            f"norm {scale:.3g}), so there is no direction to extract; the two prompt sets are identical or the "
            "model ignores their difference. Use distinct harmful and harmless prompts"
        )
    info = {"gap_norm": float(gap_norm)}
    if method == "diff_means":
        return (gap / gap_norm).unsqueeze(0), info
    if method == "pca_diff":
        m2 = stats.diff_m2 / max(stats.n_pairs, 1)
        values, vectors = torch.linalg.eigh(m2)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        rank_ok = values[k - 1] > _RANK_RTOL * values[0]
        rows, spectrum, what = vectors[:, :k].T, values, "paired differences"
        info["explained"] = float(values[:k].sum() / values.clamp_min(0).sum())
    else:  # class_means
        present = stats.cat_counts[0] > 0
        harmful_means = stats.cat_sums[0][present] / stats.cat_counts[0][present].unsqueeze(1)
        if bool((stats.cat_counts[1][present] > 0).all()):  # paired: each category's own harmless partners
            harmless_means = stats.cat_sums[1][present] / stats.cat_counts[1][present].unsqueeze(1)
        else:
            harmless_means = mu_b.expand_as(harmful_means)
        deltas = harmful_means - harmless_means
        _, singular, vh = torch.linalg.svd(deltas, full_matrices=False)
        rank_ok = singular.numel() >= k and singular[k - 1] > _RANK_RTOL * singular[0]
        rows, spectrum, what = vh[:k], singular, f"{int(present.sum())} category mean differences"
        info["explained"] = float((singular[:k] ** 2).sum() / (singular**2).sum())
    if not rank_ok:
        rank = int((spectrum > _RANK_RTOL * spectrum[0]).sum())
        raise DirectionsError(
            f"layer {layer}: the {what} span only {rank} dimension(s), fewer than k={k} (rank-deficient subspace); "
            f"use k <= {rank} or more varied contrast prompts"
        )
    signs = torch.sign(rows @ gap)
    rows = rows * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)  # point toward harmful
    return rows, info


class SeparationStats:
    """Held-out separation per layer.

    With z = U a (the k coordinates of a prompt's activation in the subspace), c_H = U μ_H and c_B = U μ_B (training
    class means) and w = (c_H − c_B) / ‖c_H − c_B‖, the projection p = w·z is the in-subspace mean-difference axis
    (for k = 1, the direction itself). Reported: d' = (m_H − m_B) / sqrt((s²_H + s²_B) / 2), the standardised mean
    difference of p between held-out harmful and harmless prompts (unbiased variances), and ``accuracy``, the
    held-out accuracy of the nearest-class-mean classifier argmin_c ‖z − c_c‖."""

    def __init__(self, u: torch.Tensor, mu_h: torch.Tensor, mu_b: torch.Tensor) -> None:
        self.u = u  # (k, d) float64
        self.centres = torch.stack([u @ mu_h, u @ mu_b])  # (2, k)
        axis = self.centres[0] - self.centres[1]
        self.axis = axis / axis.norm().clamp_min(torch.finfo(torch.float64).tiny)
        self.s1 = torch.zeros(2, dtype=torch.float64)
        self.s2 = torch.zeros(2, dtype=torch.float64)
        self.n = torch.zeros(2, dtype=torch.float64)
        self.correct = 0

    def update(self, items: Sequence[PromptItem], a: torch.Tensor) -> None:
        z = a.to(device=self.u.device, dtype=torch.float64) @ self.u.T  # (B, k)
        side = torch.tensor([item.side for item in items], device=z.device)
        p = z @ self.axis
        for s in (0, 1):
            ps = p[side == s].cpu()
            self.s1[s] += ps.sum()
            self.s2[s] += (ps**2).sum()
            self.n[s] += ps.numel()
        nearest = torch.cdist(z, self.centres.to(z.device)).argmin(dim=1)
        self.correct += int((nearest == side).sum())

    def summary(self) -> dict[str, float | None]:
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean**2).clamp_min(0) * self.n / (self.n - 1).clamp_min(1)  # unbiased
        pooled_sd = math.sqrt(float(var.sum()) / 2)
        d_prime = float(mean[0] - mean[1]) / pooled_sd if pooled_sd > 0 else None
        return {"d_prime": d_prime, "accuracy": self.correct / float(self.n.sum())}

