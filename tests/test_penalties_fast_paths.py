"""The fast paths of the penalties at benchmark sizes, against float64 references (the main penalty tests use
small d, where the block-triangular symmetric product and the shared token index are not exercised)."""

import pytest
import torch

from orthoreg.terms.covariance import symmetric_product
from orthoreg.terms.penalties import (
    covariance_from_index,
    covariance_penalty,
    projection_from_index,
    projection_penalty,
    selected_index,
)


def ref_covariance(h, mask):
    x = h.double()[mask]
    n, d = x.shape
    xc = x - x.mean(0)
    c = xc.T @ xc / max(n - 1, 1)
    off = c - torch.diag(torch.diag(c))
    return (off**2).sum() / d


@pytest.mark.parametrize("m,n", [(700, 512), (300, 256), (50, 1030), (9, 7)])
def test_symmetric_product_equals_full_product(m, n):
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(symmetric_product(a), a.T @ a, rtol=0, atol=0)


# N ≥ d (direct form, 4 blocks), N < d (Gram form, 2 and 4 blocks), with padding and a large common offset
@pytest.mark.parametrize("B,T,d", [(4, 192, 512), (2, 150, 512), (1, 600, 1024)])
def test_covariance_at_benchmark_sizes(B, T, d):
    g = torch.Generator().manual_seed(d + T)
    h = torch.randn(B, T, d, generator=g) * 2 + torch.randn(d, generator=g) * 5
    mask = torch.rand(B, T, generator=g) < 0.9
    h32 = h.clone().requires_grad_(True)
    h64 = h.double().clone().requires_grad_(True)
    got, want = covariance_penalty(h32, mask), ref_covariance(h64, mask)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-6 * h64.grad.abs().max().item())
    assert h32.grad[~mask].abs().max() == 0


def test_index_none_means_every_token_and_no_copy():
    h = torch.randn(2, 5, 8)
    assert selected_index(torch.ones(2, 5, dtype=torch.bool)) is None
    assert selected_index(None) is None
    index = selected_index(torch.tensor([[True, False, True, True, True]] * 2))
    assert index.tolist() == [0, 2, 3, 4, 5, 7, 8, 9]
    torch.testing.assert_close(covariance_from_index(h, None), covariance_penalty(h))


def test_projection_from_index_matches_public_function():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.6
    u = torch.linalg.qr(torch.randn(16, 3, generator=g))[0].T.contiguous()
    h_ref = h + 0.1 * torch.randn(3, 7, 16, generator=g)
    index = selected_index(mask)
    coords_ref = h_ref.reshape(-1, 16)[index] @ u.T
    for one_sided in (False, True):
        a = h.clone().requires_grad_(True)
        b = h.clone().requires_grad_(True)
        pa = projection_penalty(a, u, mask, reference=h_ref, one_sided=one_sided)
        pb = projection_from_index(b, u, index, coords_ref, one_sided=one_sided)
        torch.testing.assert_close(pa, pb)
        pa.backward()
        pb.backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_penalties_stay_float32_under_autocast():
    """Mixed-precision training computes the penalties inside the model's autocast region: the products must still
    run in float32 (and backward must not mix dtypes)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 40, 24, generator=g)
    mask = torch.rand(2, 40, generator=g) < 0.8
    u = torch.linalg.qr(torch.randn(24, 2, generator=g))[0].T.contiguous()
    plain_h, auto_h = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    plain = covariance_penalty(plain_h, mask) + projection_penalty(plain_h, u, mask, reference=h * 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = covariance_penalty(auto_h, mask) + projection_penalty(auto_h, u, mask, reference=h * 0.5)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)
    plain.backward()
    auto.backward()
    torch.testing.assert_close(auto_h.grad, plain_h.grad)
