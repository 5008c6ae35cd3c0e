"""``orthoreg.realbench.specificity``: the energy shares, overlaps and the energy-matched harm-specific V, against
references computed here another way (energies from the data rows, eigenvectors from a planted decomposition and
numpy's general eigensolver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orthoreg import InputSubspaces
from orthoreg.realbench.specificity import (
    describe_subspaces,
    energy_share,
    harm_matched_subspaces,
    harm_tilted_frame,
    overlap,
    top_k_symmetric,
)

D, K = 24, 3


def projector(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v.T @ v


def rows(seed: int, harm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(harmful, harmless) input rows (N, D): both share three strong template directions; the harmful rows also
    carry ``harm`` × a harm direction (coordinate 5) that the harmless ones lack: with harm² / 2 above the third
    shared variance (16) the harmful subspace holds more pooled energy than the harmless one, so a tilt t > 0 matches."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.zeros(3, D, dtype=torch.float64)
    shared[0, 0], shared[1, 1], shared[2, 2] = 6.0, 5.0, 4.0
    noise = lambda: torch.randn(400, D, generator=g, dtype=torch.float64)  # noqa: E731
    coefficients = lambda: torch.randn(400, 3, generator=g, dtype=torch.float64)  # noqa: E731
    harmful = coefficients() @ shared + 0.3 * noise()
    harmful[:, 5] += harm * torch.randn(400, generator=g, dtype=torch.float64)
    harmless = coefficients() @ shared + 0.3 * noise()
    return harmful, harmless


def moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_energy_share_and_overlap_against_the_data_rows():
    harmful, _ = rows(0, 2.0)
    v = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q.T
    by_rows = float((harmful @ v.T).pow(2).sum() / harmful.pow(2).sum())  # ‖X Vᵀ‖² / ‖X‖²
    assert energy_share(v.float(), moment(harmful)) == pytest.approx(by_rows, rel=1e-6)
    e = torch.eye(D, dtype=torch.float64)
    assert overlap(e[:K], e[:K]) == pytest.approx(1.0)
    assert overlap(e[:K], e[K:2 * K]) == pytest.approx(0.0)
    half = torch.stack([(e[0] + e[K]) / 2 ** 0.5, e[1], e[2]])  # one direction at 45°: cos² ½
    assert overlap(half, e[:K]) == pytest.approx((0.5 + 1 + 1) / K)


def test_top_k_of_an_indefinite_matrix_is_the_planted_eigenspace():
    q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).Q
    values = torch.linspace(-5, 3, D, dtype=torch.float64)  # mostly negative: a top-k by magnitude would be wrong
    matrix = q @ torch.diag(values) @ q.T
    got = top_k_symmetric(matrix, K)
    expected = q[:, values.argsort(descending=True)[:K]].T
    assert torch.dist(projector(got), projector(expected)) < 1e-10
    assert torch.allclose(got @ got.T, torch.eye(K, dtype=torch.float64), atol=1e-12)
    assert (got.gather(1, got.abs().argmax(dim=1, keepdim=True)) > 0).all()  # deterministic signs


def test_harm_tilted_frame_matches_the_energy_and_gains_harm_contrast():
    harmful, harmless = rows(3, 8.0)
    m_h, m_b = moment(harmful), moment(harmless)
    pooled = (m_h + m_b) / 2
    generic = top_k_symmetric(m_b, K)
    target = energy_share(generic, pooled)
    v, t, e = harm_tilted_frame(m_h, m_b, target, K, tolerance=1e-6)
    assert t > 0 and e == pytest.approx(target, abs=1e-5)
    assert energy_share(v, pooled) == pytest.approx(e, abs=1e-12)
    # V is the top-k of M_h − t M_b at the returned t (numpy's general solver, not eigh)
    values, vectors = np.linalg.eig((m_h - t * m_b).numpy())
    reference = torch.from_numpy(vectors.real[:, np.argsort(-values.real)[:K]]).T
    reference = torch.linalg.qr(reference.T).Q.T
    assert torch.dist(projector(v), projector(reference)) < 1e-8
    contrast = lambda w: energy_share(w, m_h) - energy_share(w, m_b)  # noqa: E731
    assert contrast(v) > contrast(generic) + 0.01
    assert v[:, 5].pow(2).sum() > generic[:, 5].pow(2).sum() + 0.1  # it reads the planted harm direction


def test_harm_tilted_frame_keeps_t_zero_when_the_harmful_subspace_holds_less_energy():
    harmful, harmless = rows(4, 2.0)
    m_h, m_b = moment(harmful), moment(harmless)
    own = top_k_symmetric(m_h, K)
    target = energy_share(own, (m_h + m_b) / 2) + 0.05  # unreachable
    v, t, e = harm_tilted_frame(m_h, m_b, target, K)
    assert t == 0.0 and e < target
    assert torch.dist(projector(v), projector(own)) < 1e-10


def test_harm_matched_subspaces_per_module_with_shared_inputs():
    harmful, harmless = rows(5, 8.0)
    other_h, other_b = rows(6, 1.0)
    m_h = {"q": moment(harmful), "k": moment(harmful).clone(), "o": moment(other_h)}
    m_b = {"q": moment(harmless), "k": moment(harmless).clone(), "o": moment(other_b)}
    generic = InputSubspaces({n: top_k_symmetric(m_b[n], K).float() for n in m_h})
    matched = harm_matched_subspaces(m_h, m_b, generic)
    assert matched.names == generic.names and matched.k == K
    assert torch.equal(matched["q"], matched["k"])  # one moment, one frame
    assert matched.metadata["tilt"]["q"] == matched.metadata["tilt"]["k"] > 0
    for name in m_h:
        target, got = matched.metadata["pooled_energy_generic_matched"][name]
        assert target == pytest.approx(energy_share(generic[name], (m_h[name] + m_b[name]) / 2))
        assert got == pytest.approx(target, abs=2e-4)
    described = describe_subspaces(matched, m_h, m_b, generic)
    itself = describe_subspaces(generic, m_h, m_b, generic)
    assert itself["overlap_generic"] == pytest.approx(1.0, abs=1e-6)
    assert described["overlap_generic"] < 1.0 and described["harm_contrast"] > itself["harm_contrast"]
    assert described["energy_pooled"] == pytest.approx(itself["energy_pooled"], abs=2e-4)
    by_rows = float((harmful @ matched["q"].double().T).pow(2).sum() / harmful.pow(2).sum())
    expected = (by_rows + by_rows + float((other_h @ matched["o"].double().T).pow(2).sum() / other_h.pow(2).sum())) / 3
    assert described["energy_harmful"] == pytest.approx(expected, rel=1e-5)
    assert described["modules"] == 3
