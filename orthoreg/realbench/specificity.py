r"""A fair specificity test of the template-reader constraint (issue 23, item 5): is it the *harm* in V that
protects, or only the input energy V holds?

The earlier control ("contrastive" V, generalised eigenvectors of harmful against harmless inputs) could not
answer: such directions hold almost none of the inputs' energy at the template positions, so a constraint on them
constrains nearly nothing, whatever they mean. Here every V is described by the same numbers, and the harm-specific
V is built to hold as much energy as the generic one.

**Moments.** Per module m, M_m^h and M_m^b are the mean second moments of m's inputs at the template positions
(post-instruction tokens and the base's greedy first reply token, ``reader.template.TEMPLATE_POSITIONS``) of the
safety tune's harmful prompts and of orthoreg's built-in harmless requests (``reader.extraction.input_moments``);
the pooled moment is M_m^p = (M_m^h + M_m^b)/2.

**What is reported for every V** (means over modules): the energy share it holds of each moment,
e_X(V_m) = tr(V_m M_m^X V_mᵀ) / tr(M_m^X), X ∈ {h, b, p}; its harm contrast e_h − e_b; its overlap with the
generic V, ‖V_m G_mᵀ‖²_F / k (1: the same subspace, k/d_in: unrelated); and the norm of the gradient of the
recommended penalty (base units, ``defence_subspaces.gradient_norm``) at plain fine-tunes' adapters.

**The energy-matched harm-specific V** (``harm_matched_subspaces``): per module the top-k eigenvectors of
M_m^h − t_m M_m^b (largest eigenvalues, the matrix being indefinite), with t_m ≥ 0 chosen by bisection so that
e_p(V_m) equals e_p(G_m), G the generic V (top-k of M_m^b: the recommended setting's). t = 0 is the harmful
prompts' own principal subspace; raising t trades harmless energy for harm contrast, so at the matched t the
subspace holds the generic one's pooled energy with the most harm contrast this family allows. Where even t = 0
holds less pooled energy than G, t = 0 is kept and the shortfall reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["describe_subspaces", "energy_share", "harm_matched_subspaces", "harm_tilted_frame", "overlap",
           "top_k_symmetric"]


def energy_share(v: torch.Tensor, moment: torch.Tensor) -> float:
    """tr(V M Vᵀ) / tr(M) in float64: the share of the inputs' energy that span(V) holds (V: orthonormal rows)."""
    v, moment = v.double(), moment.double()
    return float(torch.trace(v @ moment @ v.T) / torch.trace(moment))


def overlap(v: torch.Tensor, w: torch.Tensor) -> float:
    """‖V Wᵀ‖²_F / k: the mean squared cosine between two k-frames' subspaces (1 when they are the same)."""
    return float((v.double() @ w.double().T).pow(2).sum() / v.shape[0])


def top_k_symmetric(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The eigenvectors of the k largest (algebraic) eigenvalues of a symmetric, possibly indefinite matrix, as
    orthonormal rows (k, d), each signed so that its largest entry is positive."""
    _, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)  # ascending
    v = vectors[:, -k:].flip(1).T
    return v * torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))


def harm_tilted_frame(m_harm: torch.Tensor, m_harmless: torch.Tensor, target: float, k: int,
                      tolerance: float = 1e-4, iterations: int = 40) -> tuple[torch.Tensor, float, float]:
    """(V, t, e_p(V)): V = top-k of M_h − t·M_b with t ≥ 0 such that V's pooled energy share equals ``target``
    (module docstring). Bisection on t; the pooled share falls as t grows (t → ∞ leaves the harmless inputs' least
    energetic directions). Returns t = 0 when even the harmful prompts' own subspace holds no more than ``target``
    (within ``tolerance``)."""
    m_harm, m_harmless = m_harm.double(), m_harmless.double()
    pooled = (m_harm + m_harmless) / 2

    def frame(t: float) -> tuple[torch.Tensor, float]:
        v = top_k_symmetric(m_harm - t * m_harmless, k)
        return v, energy_share(v, pooled)

    v, energy = frame(0.0)
    if energy <= target + tolerance:
        return v, 0.0, energy
    low, high = 0.0, 1.0
    v_high, e_high = frame(high)
    while e_high > target and high < 1e6:
        low, high = high, high * 4
        v_high, e_high = frame(high)
    best = (v_high, high, e_high)
    for _ in range(iterations):
        middle = (low + high) / 2
        v_mid, e_mid = frame(middle)
        if abs(e_mid - target) < abs(best[2] - target):
            best = (v_mid, middle, e_mid)
        if abs(e_mid - target) <= tolerance:
            break
        low, high = (middle, high) if e_mid > target else (low, middle)
    return best


def harm_matched_subspaces(m_harm: Mapping[str, torch.Tensor], m_harmless: Mapping[str, torch.Tensor],
                           generic: Any, k: int | None = None) -> Any:
    """The energy-matched harm-specific V (module docstring) of every module of ``generic`` (an
    ``InputSubspaces``), as ``InputSubspaces`` whose metadata holds each module's t and pooled energy shares.
    Modules that read the same input (q/k/v; gate/up) share one moment and so one frame, computed once."""
    from orthoreg import InputSubspaces

    frames: dict[str, torch.Tensor] = {}
    tilt: dict[str, float] = {}
    matched: dict[str, list[float]] = {}
    previous: tuple[torch.Tensor, torch.Tensor, tuple] | None = None  # modules reading one input are neighbours
    for name, g in generic.items():
        m_h, m_b = m_harm[name], m_harmless[name]
        target = energy_share(g, (m_h + m_b) / 2)
        if previous is not None and torch.equal(previous[0], m_h) and torch.equal(previous[1], m_b):
            result = previous[2]
        else:
            result = harm_tilted_frame(m_h, m_b, target, k or g.shape[0])
            previous = (m_h, m_b, result)
        v, t, e = result
        frames[name] = v.to(torch.float32)
        tilt[name] = t
        matched[name] = [target, e]
    return InputSubspaces(frames, metadata={"method": "harm_matched", "k": int(next(iter(frames.values())).shape[0]),
                                            "tilt": tilt, "pooled_energy_generic_matched": matched})


def describe_subspaces(subspaces: Any, m_harm: Mapping[str, torch.Tensor], m_harmless: Mapping[str, torch.Tensor],
                       generic: Any) -> dict[str, float]:
    """The numbers of the module docstring for one V, as means over its modules (and the min and max of the
    pooled share)."""
    rows = []
    for name, v in subspaces.items():
        e_h = energy_share(v, m_harm[name])
        e_b = energy_share(v, m_harmless[name])
        e_p = energy_share(v, (m_harm[name] + m_harmless[name]) / 2)
        rows.append((e_h, e_b, e_p, e_h - e_b, overlap(v, generic[name])))
    columns = list(zip(*rows, strict=True))
    mean = [sum(c) / len(c) for c in columns]
    return {"energy_harmful": mean[0], "energy_harmless": mean[1], "energy_pooled": mean[2], "harm_contrast": mean[3],
            "overlap_generic": mean[4], "energy_pooled_min": min(columns[2]), "energy_pooled_max": max(columns[2]),
            "modules": len(rows)}
