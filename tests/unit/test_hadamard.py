"""Hadamard transforms against closed forms: Sylvester's (−1)^popcount(i&j), exact integer
orthogonality of every base matrix, dense Kronecker products, and the RHT identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from q2lab.errors import Q2labError
from q2lab.transforms import hadamard as hd

REAL_SIZES = {576: (36, 16), 1536: (12, 128), 640: (20, 32), 192: (12, 16), 14336: (28, 512)}


def sylvester_closed_form(n: int) -> torch.Tensor:
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :]).numpy()
    pop = np.vectorize(lambda v: bin(int(v)).count("1"))(bits)
    return torch.as_tensor((-1.0) ** pop, dtype=torch.float64)


def base_orders(limit: int) -> list[int]:
    return [n for n in range(4, limit + 1, 4) if hd._base_recipe(n) is not None]


def test_issue_orders_and_constructions_are_available():
    orders = base_orders(256)
    for n in (12, 20, 28, 36, 40, 44, 52, 60, 68, 76, 84, 100, 108, 124, 132, 140, 148):
        assert n in orders, n
    # prime-power fields: 28 = Paley I over GF(27), 52 = Paley II over GF(25), 100 over GF(49)
    assert hd._base_recipe(28) == ("paley1", 27)
    assert hd._base_recipe(52) == ("paley2", 25)
    assert hd._base_recipe(100) == ("paley2", 49)
    assert hd._base_recipe(40)[0] == "kron"


@pytest.mark.parametrize("n", [*base_orders(256), 344, 368])
def test_every_base_matrix_is_exactly_hadamard(n):
    h = hd._base_matrix(n)
    assert h.shape == (n, n) and set(np.unique(h)) == {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", [2, 16, 64, 256, 1024])
def test_powers_of_two_equal_sylvester_closed_form(n):
    want = sylvester_closed_form(n) / math.sqrt(n)
    assert torch.allclose(hd.hadamard_matrix(n), want, atol=1e-12)


@pytest.mark.parametrize("n", sorted(REAL_SIZES))
def test_real_model_sizes_factor_and_match_dense_kronecker(n):
    p, s = hd.factor(n)
    assert (p, s) == REAL_SIZES[n]
    x = torch.randn(3, 2, n, dtype=torch.float64)
    if n <= 4096:
        dense = torch.kron(torch.as_tensor(hd._base_matrix(p), dtype=torch.float64), sylvester_closed_form(s))
        dense /= math.sqrt(n)
        assert torch.allclose(hd.hadamard_transform(x), x @ dense.T, atol=1e-10)
        assert torch.allclose(hd.hadamard_transform(x, inverse=True), x @ dense, atol=1e-10)
    y = hd.hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-10)
    assert torch.allclose(hd.hadamard_transform(y, inverse=True), x, atol=1e-10)


def supported_sizes(limit: int) -> list[int]:
    return [n for n in range(1, limit + 1) if hd.is_supported(n)]


def test_orthogonal_to_1e5_for_every_supported_size_up_to_768():
    sizes = supported_sizes(768)
    assert len(sizes) > 150
    for n in sizes:
        h = hd.hadamard_matrix(n, dtype=torch.float32)
        assert (h @ h.T - torch.eye(n)).abs().max() < 1e-5, n


@pytest.mark.parametrize("n", [1536, 2048, 4096, 11008, 14336])
def test_large_sizes_are_orthogonal_in_float32(n):
    x = torch.randn(64, n)
    y = hd.hadamard_transform(x)
    assert (y.norm(dim=-1) / x.norm(dim=-1) - 1).abs().max() < 1e-5
    assert (hd.hadamard_transform(y, inverse=True) - x).abs().max() < 1e-5 * x.abs().max() * 10
    # the columns of H: probes with unit vectors are orthonormal rows of Hᵀ
    idx = torch.randperm(n)[:32]
    cols = hd.hadamard_transform(torch.eye(n)[idx])
    gram = cols @ cols.T
    assert (gram - torch.eye(32)).abs().max() < 1e-5


@pytest.mark.parametrize("n", [0, 6, 7, 92, 2 * 23, 4 * 23])
def test_unsupported_sizes_raise_a_clear_error(n):
    with pytest.raises(hd.UnsupportedSizeError) as exc:
        hd.factor(n)
    assert isinstance(exc.value, Q2labError)
    with pytest.raises(Q2labError):
        hd.hadamard_transform(torch.zeros(2, max(n, 1)) if n else torch.zeros(2, 0))
    if n:
        assert "nearest supported sizes" in str(exc.value)
        assert all(hd.is_supported(m) and m >= n for m in hd.nearest_supported(n))


def test_dtypes_and_leading_dims():
    x = torch.randn(2, 3, 4, 640)
    y64 = hd.hadamard_transform(x.double())
    assert y64.shape == x.shape and y64.dtype == torch.float64
    assert torch.allclose(hd.hadamard_transform(x), y64.float(), atol=1e-5)
    yb = hd.hadamard_transform(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), y64.float(), atol=0.1)


def test_rht_identities():
    m, n = 192, 576
    rht = hd.RHT.make(m, n, seed=7)
    assert torch.equal(rht.s_in, hd.RHT.make(m, n, seed=7).s_in)
    assert not torch.equal(rht.s_in, hd.RHT.make(m, n, seed=8).s_in)
    assert set(rht.s_in.tolist()) == {-1.0, 1.0} and rht.shape == (m, n)
    w = torch.randn(m, n, dtype=torch.float64)
    x = torch.randn(500, n, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    h = x.T @ x
    wt, ht = rht.weight(w), rht.hessian(h)
    assert torch.allclose(rht.unweight(wt), w, atol=1e-12)
    assert torch.allclose(ht, ht.T, atol=1e-9)
    # same layer, same calibration output error: tr(W H Wᵀ) is invariant
    assert torch.allclose(((wt @ ht) * wt).sum(), ((w @ h) * w).sum(), rtol=1e-10)
    # the layer computed in the transformed basis: y = Uᵀ W̃ (V x)
    assert torch.allclose(rht.outputs(rht.inputs(x) @ wt.T), x @ w.T, atol=1e-9)
    # incoherence: a spiky weight becomes flat
    spiky = torch.zeros(m, n, dtype=torch.float64)
    spiky[3, 5] = 1.0
    assert rht.weight(spiky).abs().max() < 2 / math.sqrt(m * n)


def test_sign_packing_roundtrip():
    s = hd.random_signs(1001, seed=3)
    packed = hd.pack_signs(s)
    assert packed.numel() == math.ceil(1001 / 8)
    assert torch.equal(hd.unpack_signs(packed, 1001), s)
