r"""Superposition density per layer: how full the residual stream is, and how much of it the harmful directions use.

With C_ℓ the (d, d) covariance of layer ℓ's output over the counted tokens of some data (the task's, by default in
``orthoreg audit``), eigenvalues λ_1 ≥ … ≥ λ_d, and U_ℓ (k, d) the orthonormal harmful directions:

.. math::

    \mathrm{PR}_\ell = \frac{(\sum_i \lambda_i)^2}{\sum_i \lambda_i^2} = \frac{\mathrm{tr}(C)^2}{\|C\|_F^2},
    \qquad \rho_\ell = \frac{\mathrm{PR}_\ell}{d} \in (0, 1]
    \qquad\text{(the density score)}

.. math::

    \eta_\ell = \frac{\mathrm{tr}(U C U^\top)}{\mathrm{tr}(C)} = \sum_i \frac{\lambda_i}{\mathrm{tr} C}\,\|U v_i\|^2,
    \qquad \epsilon_\ell = \eta_\ell \big/ \tfrac{k}{d}
    \qquad\text{(harmful share of the variance, and its enrichment over an isotropic cloud)}

**Why these.** Superposition means a layer represents more features than it has dimensions, so features share
directions (Elhage et al., *Toy Models of Superposition*, 2022). Features are not observable, but their footprint is:
a layer that carries few, sparse features concentrates its variance on a few principal directions (PR ≪ d) and has
unused directions where fine-tuning can write a new task feature without touching existing ones; a densely packed
layer spreads its variance over nearly all of them (ρ → 1), so any new feature must overlap with features already
there — including the harmful ones. ρ is the participation ratio (the effective number of dimensions in use) relative
to the width; it is scale-free and cheap (one streaming pass, no eigendecomposition). η is the variance-weighted mean
overlap of the principal directions v_i with the harmful subspace: ε > 1 means the harmful directions lie among the
directions the layer uses most, so the task's features are more likely to share them. The article this project starts
from claims denser superposition makes fine-tuning riskier; ``scripts/bench_firewall.py`` measures ρ against the
harmful-output rise across model widths in the toy world (``benchmarks/README_firewall.md``).

**Estimation.** C is accumulated in float64 on the CPU from shifted activations (x − the first batch's mean, so a
large common offset — massive activations — does not cancel catastrophically). Memory is d² · 8 bytes per layer
(128 MiB at d = 4096). With N tokens the sample covariance has rank ≤ N − 1, so PR ≤ N − 1: ρ is only meaningful with
N ≫ d tokens (the report carries ``n_tokens`` and warns when N < 2d).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.capture import find_decoder_stack, layer_hidden, resolve_layers, token_mask
from ..directions.harmful import HarmfulDirections

__all__ = ["DensityReport", "covariance_density", "superposition_density"]


@dataclass
class DensityReport:
    """Result of :func:`superposition_density` (per layer; JSON via ``to_dict``).

    Attributes:
        density: layer → ρ = PR/d (the superposition-density score, 0–1).
        participation_ratio: layer → PR = tr(C)² / ‖C‖²_F.
        harmful_share: layer → η = tr(U C Uᵀ)/tr(C) (absent without directions for the layer).
        enrichment: layer → ε = η / (k/d).
        hidden_size, n_tokens: d and the number of counted tokens.
    """

    density: dict[int, float]
    participation_ratio: dict[int, float]
    harmful_share: dict[int, float] = field(default_factory=dict)
    enrichment: dict[int, float] = field(default_factory=dict)
    hidden_size: int = 0
    n_tokens: int = 0

    @property
    def mean_density(self) -> float:
        return sum(self.density.values()) / max(len(self.density), 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("density", "participation_ratio", "harmful_share", "enrichment"):
            data[key] = {str(k): v for k, v in data[key].items()}
        data["mean_density"] = self.mean_density
        return data

    def table(self) -> str:
        rows = [f"{'layer':>5}  {'density PR/d':>12}  {'PR':>8}  {'harmful share':>13}  {'enrichment':>10}"]
        for layer in self.density:
            share = self.harmful_share.get(layer)
            enrich = self.enrichment.get(layer)
            rows.append(f"{layer:>5}  {self.density[layer]:>12.3f}  {self.participation_ratio[layer]:>8.1f}  "
                        f"{'-' if share is None else f'{share:.4f}':>13}  {'-' if enrich is None else f'{enrich:.2f}':>10}")
        return "\n".join(rows)


def covariance_density(cov: torch.Tensor, u: torch.Tensor | None = None) -> tuple[float, float, float | None]:
    """(ρ, PR, η) of one (d, d) covariance matrix; η is ``None`` without ``u`` (k, d) orthonormal rows."""
    cov = cov.double()
    d = cov.shape[0]
    trace = float(torch.diagonal(cov).sum())
    frob2 = float(cov.square().sum())
    if trace <= 0 or frob2 <= 0:
        return 0.0, 0.0, None if u is None else 0.0
    pr = trace * trace / frob2
    share = None
    if u is not None:
        u = u.double().to(cov.device)
        share = float(torch.einsum("kd,de,ke->", u, cov, u)) / trace
    return pr / d, pr, share


@torch.no_grad()
def superposition_density(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    layers: Any = "all",
    directions: HarmfulDirections | None = None,
    *,
    mask: str = "attention",
    max_tokens: int | None = None,
) -> DensityReport:
    """Density score ρ and harmful share η per layer (module docstring) on ``batches`` of model kwargs.

    Args:
        model (`nn.Module`): a causal LM (PEFT-wrapped is fine); runs in eval mode (restored after), no grad.
        batches: model kwargs (``input_ids``, ``attention_mask``, ``labels`` for ``mask="labels"``) on its device.
        layers (*optional*, defaults to `"all"`): layers to score (``resolve_layers`` spec).
        directions (`HarmfulDirections`, *optional*): for η and ε on the layers that have directions.
        mask (`str`, *optional*, defaults to `"attention"`): counted tokens.
        max_tokens (`int`, *optional*): stop after this many counted tokens.

    Raises:
        ValueError: no tokens were counted.
    """
    stack = find_decoder_stack(model)
    chosen: Sequence[int] = resolve_layers(layers, stack.num_layers)
    d = stack.hidden_size
    sums: dict[int, torch.Tensor] = {}
    outer: dict[int, torch.Tensor] = {}
    shift: dict[int, torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured.setdefault(index, layer_hidden(output).detach())
        return hook

    handles = [stack.layers[i].register_forward_hook(make_hook(i)) for i in chosen]
    was_training = stack.lm.training
    stack.lm.eval()
    n_tokens = 0
    try:
        for batch in batches:
            inputs = dict(batch)
            ids = inputs.get("input_ids")
            shape = tuple(ids.shape[:2]) if isinstance(ids, torch.Tensor) else None
            captured.clear()
            model(**inputs)
            selected = None if shape is None else token_mask(inputs, shape, mask).reshape(-1)
            for i in chosen:
                x = captured[i].reshape(-1, d)
                if selected is not None:
                    x = x[selected.to(x.device)]
                x = x.to("cpu", torch.float64)
                if x.shape[0] == 0:
                    continue
                if i not in shift:
                    shift[i] = x.mean(dim=0)
                    sums[i] = torch.zeros(d, dtype=torch.float64)
                    outer[i] = torch.zeros(d, d, dtype=torch.float64)
                xs = x - shift[i]
                sums[i] += xs.sum(dim=0)
                outer[i] += xs.T @ xs
            n_tokens += int(selected.sum()) if selected is not None else int(captured[chosen[0]].shape[:-1].numel())
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        stack.lm.train(was_training)
    if n_tokens < 2 or not outer:
        raise ValueError("the density needs at least two counted tokens; the batches are empty or all padding")
    if n_tokens < 2 * d:
        warnings.warn(f"superposition density from {n_tokens} tokens at hidden size {d}: with fewer than 2·d tokens "
                      "the participation ratio is capped by the sample size (PR ≤ N − 1); use more data",
                      stacklevel=2)
    report = DensityReport(density={}, participation_ratio={}, hidden_size=d, n_tokens=n_tokens)
    for i in chosen:
        if i not in outer:
            continue
        mean = sums[i] / n_tokens
        cov = (outer[i] - n_tokens * torch.outer(mean, mean)) / max(n_tokens - 1, 1)
        u = directions[i] if directions is not None and i in directions else None
        rho, pr, share = covariance_density(cov, u)
        report.density[i], report.participation_ratio[i] = rho, pr
        if share is not None:
            report.harmful_share[i] = share
            report.enrichment[i] = share / (u.shape[0] / d) if share == share and math.isfinite(share) else 0.0
    return report
