"""QTIP trellis, codes and Viterbi against independent oracles: exhaustive search over every
bit stream of small trellises, published code constants, and a rate–distortion window."""

from __future__ import annotations

import itertools

import pytest
import torch

from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.qtip.codes import code_table, one_mad, three_inst
from q2lab.quant.qtip.trellis import Trellis
from q2lab.quant.qtip.viterbi import decode, quantize_sequences, viterbi


def stream_states(bits: tuple[int, ...], tr: Trellis, n: int, cyclic: bool) -> list[int]:
    """States of a bit stream read as L-bit windows sliding kV bits (the oracle's own decoder)."""
    out = []
    for i in range(n):
        if cyclic:  # s_i = the L bits ending at position (i+1)·kV of the cyclic stream
            end = (i + 1) * tr.kv
            win = [bits[(end - tr.L + j) % len(bits)] for j in range(tr.L)]
        else:
            win = list(bits[i * tr.kv : i * tr.kv + tr.L])
        out.append(int("".join(map(str, win)), 2))
    return out


def exhaustive(x: torch.Tensor, table: torch.Tensor, tr: Trellis, cyclic: bool) -> torch.Tensor:
    """Minimum squared error over every bit stream (every path of the trellis), per sequence."""
    n = x.shape[1] // tr.V
    nbits = n * tr.kv if cyclic else tr.L + (n - 1) * tr.kv
    paths = torch.tensor([stream_states(b, tr, n, cyclic) for b in itertools.product((0, 1), repeat=nbits)])
    rec = decode(paths, table, tr)  # (P, T)
    return ((x[:, None, :] - rec[None]) ** 2).sum(-1).min(dim=1).values


CASES = [Trellis(4, 1, 1), Trellis(5, 2, 1), Trellis(6, 2, 1), Trellis(4, 1, 2), Trellis(5, 2, 2)]


@pytest.mark.parametrize("tr", CASES, ids=lambda t: f"L{t.L}k{t.k}V{t.V}")
def test_viterbi_matches_exhaustive_search(tr):
    g = torch.Generator().manual_seed(tr.L * 10 + tr.k)
    steps = {1: 5, 2: 4}.get(tr.kv, 3)
    x = torch.randn(6, steps * tr.V, generator=g)
    table = torch.randn(tr.n_states, tr.V, generator=g)
    # unconstrained paths
    st, cost = viterbi(x, table, tr)
    assert torch.allclose(cost, exhaustive(x, table, tr, cyclic=False), atol=1e-5)
    assert torch.allclose(((decode(st, table, tr) - x) ** 2).sum(1), cost, atol=1e-5)
    # tail-biting: the exact mode equals exhaustive search over cyclic streams; the two-pass
    # approximation is a valid tail-biting path, never better than the optimum.
    best = exhaustive(x, table, tr, cyclic=True)
    for mode in ("exact", "approx"):
        st, rec = quantize_sequences(x, table, tr, tail_biting=mode)
        assert bool(tr.is_tail_biting(st).all())
        err = ((rec - x) ** 2).sum(1)
        if mode == "exact":
            assert torch.allclose(err, best, atol=1e-5)
        else:
            assert bool((err >= best - 1e-5).all())


def test_chunked_viterbi_equals_one_chunk():
    tr = Trellis(8, 2, 1)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    table = code_table("gauss", 8)
    a, ca = viterbi(x, table, tr)
    b, cb = viterbi(x, table, tr, max_bytes=1)  # one sequence per chunk
    assert torch.equal(a, b) and torch.allclose(ca, cb)


@pytest.mark.parametrize("tr", [Trellis(8, 2, 1), Trellis(10, 3, 1), Trellis(9, 2, 2)], ids=str)
def test_tail_biting_pack_roundtrip(tr):
    x = torch.randn(7, 12 * tr.V, generator=torch.Generator().manual_seed(2))
    table = code_table("gauss", tr.L, tr.V)
    st, _ = quantize_sequences(x, table, tr)
    packed = tr.pack(st)
    assert packed.numel() == -(-st.numel() * tr.kv // 8)  # exactly k bits per weight (+ last byte)
    assert torch.equal(tr.unpack(packed, tuple(st.shape)), st)


def test_invalid_trellis_and_lengths_raise_clear_errors():
    with pytest.raises(ConfigError):
        Trellis(2, 2, 1)
    with pytest.raises(ConfigError):
        Trellis(8, 2, 3)
    with pytest.raises(ShapeError):
        Trellis(8, 2, 2).steps(7)


def test_computed_codes_follow_the_published_definitions():
    # 1MAD of state 0: LCG offset b = 76625530 = 0x0491367A, bytes 0x04+0x91+0x36+0x7A = 325;
    # of state 1: a + b, with Python's own integers.
    assert one_mad(torch.tensor([0])).item() == pytest.approx((325 - 510) / 147.8)
    x1 = (34038481 + 76625530) % 2**32
    assert one_mad(torch.tensor([1])).item() == pytest.approx((sum(x1.to_bytes(4, "little")) - 510) / 147.8)
    # 3INST of state 0: b = 64248484 = 0x03D45AA4; halves masked/xored into fp16 patterns.
    lo, hi = (0x5AA4 & 0x8FFF) ^ 0x3B60, (0x03D4 & 0x8FFF) ^ 0x3B60
    expect = sum(float(torch.tensor([h], dtype=torch.int16).view(torch.float16)) for h in (lo, hi))
    assert three_inst(torch.tensor([0])).item() == pytest.approx(expect)
    for name in ("1mad", "3inst", "gauss"):
        t = code_table(name, 14)
        assert abs(float(t.mean())) < 0.02 and float(t.square().mean()) == pytest.approx(1.0, abs=1e-4)
        # near-Gaussian: P(|z| < 1) ≈ 0.683
        assert float((t.abs() < 1).float().mean()) == pytest.approx(0.683, abs=0.03)


@pytest.mark.parametrize("code", ["1mad", "3inst", "hyb"])
def test_rate_distortion_at_2_bits_small_trellis(code):
    """L = 10, 2 bits: well under scalar Lloyd–Max (0.1175), above the bound (0.0625).

    The full table (L up to 16, ≤ 0.070) is produced by benchmarks/qtip_rate_distortion.py.
    """
    v = 2 if code == "hyb" else 1
    tr = Trellis(10, 2, v)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    _, rec = quantize_sequences(x * 0.95, code_table(code, 10), tr)
    mse = float(((rec / 0.95 - x) ** 2).mean())
    assert 0.0625 < mse < 0.088
