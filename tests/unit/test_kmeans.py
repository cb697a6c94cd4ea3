"""Shared weighted k-means (q2lab/codebooks/kmeans.py) against brute force and known rates."""

from __future__ import annotations

import pytest
import torch

from q2lab.codebooks import kmeans as km
from q2lab.errors import ConfigError, ModelError, ShapeError

LLOYD_MAX_2BIT = 0.1175  # MSE of the optimal scalar 2-bit quantizer of N(0, 1)


def brute(x, c, w=None):
    w = torch.ones_like(x) if w is None else (w if w.ndim == 2 else w.expand_as(x))
    d = (w.unsqueeze(1) * (x.unsqueeze(1) - c.unsqueeze(0)).square()).sum(2)
    return d.min(1)


def naive_lloyd(x, c, w, iters):
    """Textbook Lloyd iterations (full search every time), weighted per coordinate."""
    wf = w.expand_as(x) if w is not None else torch.ones_like(x)
    codes = brute(x, c, wf).indices
    for _ in range(iters):
        new = c.clone()
        for j in range(c.shape[0]):
            sel = codes == j
            if sel.any():
                new[j] = (wf[sel] * x[sel]).sum(0) / wf[sel].sum(0)
        c = new
        codes = brute(x, c, wf).indices
    return c, codes


@pytest.mark.parametrize("kind", ["none", "shared", "per-vector"])
def test_nearest_matches_brute_force(kind):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 6, generator=g), torch.randn(512, 6, generator=g)
    w = {
        "none": None,
        "shared": torch.rand(6, generator=g) + 0.1,
        "per-vector": torch.rand(300, 6, generator=g),
    }[kind]
    codes, dist = km.nearest_with_distance(x, c, w)
    ref = brute(x, c, w)
    assert torch.equal(codes, ref.indices)
    assert torch.allclose(dist, ref.values, atol=1e-4)
    codes2, _d1, d2 = km.nearest_two(x, c, w)
    assert torch.equal(codes2, codes)
    wf = torch.ones_like(x) if w is None else (w if w.ndim == 2 else w.expand_as(x))
    full = (wf.unsqueeze(1) * (x.unsqueeze(1) - c.unsqueeze(0)).square()).sum(2)
    assert torch.allclose(d2, full.sort(1).values[:, 1], atol=1e-4)


@pytest.mark.parametrize("k", [7, 128, 4096])
def test_row_min_is_torch_min(k):
    d = torch.randn(33, k, generator=torch.Generator().manual_seed(k))
    d[3, k // 2] = d[3, 0] = -100.0  # a tie: the first index wins
    best, idx = km.row_min(d)
    ref = d.min(dim=1)
    assert torch.equal(best, ref.values) and torch.equal(idx, ref.indices)
    assert int(idx[3]) == 0


def test_lloyd_with_bounds_equals_the_textbook_iteration():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 3, generator=g)
    w = torch.rand(3, generator=g) + 0.2
    init = x[:40].clone()
    res = km.kmeans(x, 40, w, iters=8, tol=0.0, init=init)
    c_ref, codes_ref = naive_lloyd(x, init, w, 8)
    assert torch.equal(res.codes, codes_ref)
    assert torch.allclose(res.centroids, c_ref, atol=1e-5)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(res.losses, res.losses[1:]))  # Lloyd never rises


def test_two_bit_gaussian_codebook_beats_scalar_quantization():
    # 4-dim vectors, 256 centroids = 2 bits per coordinate; the held-out MSE of a trained VQ is
    # below the best scalar 2-bit quantizer's (space-filling gain), the training MSE lower still
    g = torch.Generator().manual_seed(2)
    x, held = torch.randn(32768, 4, generator=g), torch.randn(32768, 4, generator=g)
    res = km.kmeans(x, 256, iters=30, seed=0)
    train = res.losses[-1] / x.numel()
    test = float((held - res.centroids[km.nearest(held, res.centroids)]).square().mean())
    assert train < test < LLOYD_MAX_2BIT
    assert test > 2.0**-4  # Shannon's D(R = 2) = 1/16: no code beats it


def test_hessian_weights_move_error_to_unimportant_coordinates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8192, 2, generator=g)
    w = torch.tensor([100.0, 1.0])
    plain = km.kmeans(x, 16, iters=20, seed=0)
    weighted = km.kmeans(x, 16, w, iters=20, seed=0)
    err = lambda r: (x - r.centroids[r.codes]).square().mean(0)
    assert err(weighted)[0] < err(plain)[0] and err(weighted)[1] > err(plain)[1]


def test_seeded_and_deterministic():
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(4))
    a, b = km.kmeans(x, 64, seed=5, iters=5), km.kmeans(x, 64, seed=5, iters=5)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    assert not torch.equal(a.centroids, km.kmeans(x, 64, seed=6, iters=5).centroids)


def test_plusplus_draws_distinct_vectors_even_with_duplicates():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2), torch.randn(20, 2)])
    c = km.kmeans_plusplus(x, 30, seed=0)
    assert c.shape == (30, 2)
    assert km.kmeans(x, 30, iters=3).centroids.isfinite().all()


def test_bad_input_is_one_clear_error():
    x = torch.randn(10, 4)
    with pytest.raises(ConfigError, match="larger than the 10 vectors"):
        km.kmeans(x, 11)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ModelError, match="non-finite"):
        km.kmeans(bad, 4)
    with pytest.raises(ShapeError, match="weights of shape"):
        km.kmeans(x, 4, torch.ones(3))
    with pytest.raises(ShapeError, match="centroids"):
        km.nearest(x, torch.randn(5, 3))
