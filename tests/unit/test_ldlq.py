"""BlockLDLQ against independent oracles: GPTQ (g = 1), the block LDL identity, no feedback
when H ∝ I, exactness of the lazy batch, and a lower proxy loss than rounding."""

from __future__ import annotations

import pytest
import torch

from q2lab.calib.hessian import Hessian
from q2lab.errors import ShapeError
from q2lab.quant import uniform
from q2lab.quant.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from q2lab.quant.ldlq import cholesky_factor, ldlq, proxy_loss


def correlated_hessian(n: int, tokens: int = 4096, seed: int = 0) -> Hessian:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.2 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * torch.linspace(0.2, 3.0, n)
    return Hessian((x.T @ x).double(), tokens)


def grid_quantizer(step: float):
    """A g-dimensional quantizer: the integer lattice scaled by ``step`` (codes: the integers)."""

    def qb(col: int, blk: torch.Tensor):
        c = torch.round(blk / step)
        return c * step, c.to(torch.int32)

    return qb


@pytest.mark.parametrize("clip", ["minmax", "mse"])
@pytest.mark.parametrize("block_size", [128, 37, 1])
def test_g1_with_a_scalar_grid_reproduces_gptq_exactly(clip, block_size):
    w = torch.randn(64, 300)
    hess = correlated_hessian(300)
    cfg = GPTQConfig(bits=2, group_size=None, act_order=False, clip=clip, block_size=block_size)
    codes, scales, _zeros, _perm, _layout = gptq_quantize(w, hess, cfg)
    h, wp = prepare_hessian(hess, w)
    scale, zero = uniform.fit_group(wp, 2, False, clip, torch.diagonal(h))

    def qb(col, blk):
        c = uniform.round_to_grid(blk, scale, zero, 2)
        return uniform.from_grid(c, scale, zero), c

    res = ldlq(wp, h, 1, qb, damp=cfg.damp, block_size=block_size)
    assert torch.equal(scales[:, 0], scale)
    assert torch.equal(res.codes.to(torch.int32), codes)
    assert torch.equal(res.values, uniform.from_grid(codes.float(), scale, zero))


@pytest.mark.parametrize("g", [2, 4, 8])
def test_block_ldl_identity(g):
    """H = U D Uᵀ with U = R⁻¹·blockdiag(R) unit block upper triangular, D block diagonal."""
    n = 48
    h = correlated_hessian(n).mean(torch.float64)
    r = cholesky_factor(h, damp=0.0).double()
    hd = torch.linalg.inv(r) @ torch.linalg.inv(r).T  # the (barely) damped H that R factors
    blocks = torch.block_diag(*[r[i : i + g, i : i + g] for i in range(0, n, g)])
    u = torch.linalg.inv(r) @ blocks
    d = torch.linalg.inv(blocks) @ torch.linalg.inv(blocks).T
    assert torch.allclose(u @ d @ u.T, hd, rtol=1e-6, atol=1e-6 * hd.abs().max())
    mask = torch.block_diag(*[torch.ones(g, g)] * (n // g)).bool()
    assert torch.allclose(u * mask, torch.eye(n, dtype=u.dtype), atol=1e-6)
    assert torch.allclose(torch.tril(u, -1), torch.zeros_like(u), atol=1e-9)
    assert torch.allclose(d * ~mask, torch.zeros_like(d), atol=1e-9)


@pytest.mark.parametrize("g", [1, 8])
def test_each_block_sees_the_quip_feedback_formula(g):
    """The quantizer's input for block k is W_k + Σ_{j<k} (W_j − Ŵ_j)·(U − I)_jk (QuIP#, eq. LDLQ)."""
    n = 64
    w = torch.randn(24, n)
    h = correlated_hessian(n, seed=2).mean()
    r = cholesky_factor(h)
    seen: dict[int, torch.Tensor] = {}
    qb = grid_quantizer(0.6)

    def spy(col, blk):
        seen[col] = blk.clone()
        return qb(col, blk)

    res = ldlq(w, h, g, spy, upper=r, block_size=16)
    rd = r.double()
    blocks = torch.block_diag(*[rd[i : i + g, i : i + g] for i in range(0, n, g)])
    a = torch.linalg.inv(rd) @ blocks - torch.eye(n, dtype=torch.float64)
    fed = w.double() + (w.double() - res.values.double()) @ a
    for col, blk in seen.items():
        assert torch.allclose(blk.double(), fed[:, col : col + g], atol=1e-4), col


def test_identity_hessian_means_no_feedback():
    w = torch.randn(32, 64)
    qb = grid_quantizer(0.37)
    res = ldlq(w, torch.eye(64) * 3.0, 8, qb)
    assert torch.equal(res.values, qb(0, w)[0])
    assert res.codes.shape == (32, 64)


def test_lazy_batch_is_exact():
    w = torch.randn(40, 96)
    h = correlated_hessian(96).mean()
    runs = [ldlq(w, h, 8, grid_quantizer(0.5), block_size=bs) for bs in (8, 24, 64, 128)]
    for r in runs[1:]:
        assert torch.allclose(r.values, runs[0].values, atol=1e-5)
        assert (r.codes != runs[0].codes).float().mean() < 1e-3


@pytest.mark.parametrize("g", [1, 4, 8])
def test_feedback_lowers_the_proxy_loss(g):
    w = torch.randn(64, 128)
    h = correlated_hessian(128, seed=1).mean()
    qb = grid_quantizer(0.8)
    fed = proxy_loss(w, ldlq(w, h, g, qb).values, h)
    rounded = proxy_loss(w, qb(0, w)[0], h)
    assert fed < 0.8 * rounded


def test_shape_errors():
    with pytest.raises(ShapeError):
        ldlq(torch.randn(4, 12), torch.eye(12), 8, grid_quantizer(1.0))
    with pytest.raises(ShapeError):
        ldlq(torch.randn(4, 16), torch.eye(8), 8, grid_quantizer(1.0))


def test_block_widths_as_a_sequence_match_the_fixed_width_and_any_lazy_batch():
    w = torch.randn(24, 96)
    h = correlated_hessian(96, seed=3).mean()
    fixed = ldlq(w, h, 8, grid_quantizer(0.5))
    seq = ldlq(w, h, [8] * 12, grid_quantizer(0.5))
    assert torch.allclose(seq.values, fixed.values, atol=1e-5) and torch.equal(seq.codes, fixed.codes)
    # VPTQ's layout: 16 columns in blocks of 2, then blocks of 8; blocks of 1 are GPTQ's columns
    widths = [2] * 8 + [8] * 10
    runs = [ldlq(w, h, widths, grid_quantizer(0.5), block_size=bs) for bs in (1, 20, 64, 128)]
    for r in runs[1:]:
        assert torch.allclose(r.values, runs[0].values, atol=1e-5)
    ones = ldlq(w, h, [1] * 96, grid_quantizer(0.5))
    assert torch.allclose(ones.values, ldlq(w, h, 1, grid_quantizer(0.5)).values, atol=1e-5)
    assert proxy_loss(w, runs[0].values, h) < proxy_loss(w, grid_quantizer(0.5)(0, w)[0], h)
    with pytest.raises(ShapeError, match="sum to the 96 columns"):
        ldlq(w, h, [8] * 11, grid_quantizer(0.5))
