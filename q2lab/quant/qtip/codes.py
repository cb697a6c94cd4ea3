"""Codes of the bitshift trellis: what value(s) an L-bit state decodes to (QTIP §3.2).

A trellis with 2^L states needs a 2^L × V codebook that is (1) close to i.i.d. Gaussian, so
that the trellis reaches Gaussian rate–distortion performance, and (2) cheap to produce at
inference.  QTIP's *computed* codes hash the state into a pseudo-random Gaussian value with a
few integer instructions, so nothing is stored or looked up:

* ``1mad`` (V = 1): one multiply-add (a 32-bit LCG, x ← a·x + b mod 2^32), then the sum of the
  four bytes of x — approximately Gaussian by the central limit theorem (mean 510, std ≈ 147.8).
* ``3inst`` (V = 1): the LCG, then mask/xor so that each 16-bit half is the bit pattern of an
  fp16 number with a random sign, a random 2-bit low exponent and a random mantissa around
  ±0.922 (a two-sided exponential-ish shape); the sum of the two halves is near Gaussian.
* ``hyb`` (V = 2): hash x ← x² + x, take Q bits of it as an index into a small 2^Q × 2 table
  (k-means centres of a 2-D Gaussian) and flip the first coordinate's sign with bit 15: only
  a 2^Q-entry table (stored with the weights), the rest computed.
* ``gauss``: a random Gaussian 2^L × V codebook drawn from a fixed seed: the classical TCQ
  baseline the computed codes are compared with (regenerated from the seed, never stored).

Every code here is normalized to unit RMS per coordinate over the 2^L states; the quantizer
applies its own scale.  The multiplier/offset/mask constants are the published ones (QTIP
Algorithms 1–2); the implementation is ours.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from q2lab.errors import ConfigError

CODES = ("1mad", "3inst", "hyb", "gauss")
_M32 = (1 << 32) - 1

# Published constants: LCG multipliers/offsets and the 3INST fp16 mask/xor pattern per half.
_1MAD_A, _1MAD_B = 34038481, 76625530
_3INST_A, _3INST_B = 89226354, 64248484
_3INST_KEEP = 0x8FFF  # sign bit, low 2 exponent bits, 10 mantissa bits of each fp16 half
_3INST_XOR = 0x3B60  # the fp16 bit pattern of 0.922


def code_dims(name: str) -> int:
    """V: how many weights one state decodes to."""
    check_code(name)
    return 2 if name == "hyb" else 1


def check_code(name: str, v: int | None = None) -> None:
    if name not in CODES:
        raise ConfigError(f"unknown trellis code {name!r}; known codes: {', '.join(CODES)}")
    if v is not None and name in ("1mad", "3inst", "hyb") and v != code_dims(name):
        raise ConfigError(f"code {name} decodes {code_dims(name)} weight(s) per state, not V={v}")


def one_mad(states: torch.Tensor) -> torch.Tensor:
    """1MAD, unnormalized: (sum of the 4 bytes of a·x + b mod 2^32 − 510) / 147.8."""
    x = (states.to(torch.int64) * _1MAD_A + _1MAD_B) & _M32
    s = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
    return (s - 510).to(torch.float32) / 147.8


def _fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret 16-bit patterns (int64 in [0, 2^16)) as fp16 values, returned as float32."""
    as_i16 = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
    return as_i16.view(torch.float16).to(torch.float32)


def three_inst(states: torch.Tensor) -> torch.Tensor:
    """3INST, unnormalized: the sum of the two fp16 numbers the masked LCG output encodes."""
    x = (states.to(torch.int64) * _3INST_A + _3INST_B) & _M32
    lo = (x & _3INST_KEEP) ^ _3INST_XOR
    hi = ((x >> 16) & _3INST_KEEP) ^ _3INST_XOR
    return _fp16_from_bits(lo) + _fp16_from_bits(hi)


def hyb(states: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """HYB: (..., 2) values from a 2^Q × 2 table indexed by Q bits of x² + x, sign from bit 15."""
    q = int(lut.shape[0]).bit_length() - 1
    x = states.to(torch.int64)
    h = (x * x + x) & _M32
    idx = (h >> (15 - q)) & ((1 << q) - 1)
    v = lut.to(torch.float32)[idx]
    flip = 1.0 - 2.0 * ((h >> 15) & 1).to(torch.float32)
    return torch.stack([v[..., 0] * flip, v[..., 1]], dim=-1)


@functools.cache
def hyb_lut(q: int = 9, seed: int = 0) -> torch.Tensor:
    """The 2^q × 2 HYB table: k-means centres of a seeded 2-D standard Gaussian sample.

    Computed once per process in float64 numpy and rounded to fp16; the method stores the
    table with the weights (fp16) so decoding never depends on rerunning k-means.
    """
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((32 << q, 2))
    centres = data[rng.choice(len(data), 1 << q, replace=False)].copy()
    for _ in range(30):
        d = (data**2).sum(1)[:, None] - 2 * data @ centres.T + (centres**2).sum(1)[None]
        assign = d.argmin(1)
        k = len(centres)
        sums = np.stack([np.bincount(assign, weights=data[:, j], minlength=k) for j in range(2)], 1)
        counts = np.bincount(assign, minlength=k)[:, None]
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    centres /= np.sqrt((centres**2).mean(0))  # unit RMS per coordinate (centres are ~equiprobable)
    return torch.from_numpy(centres).to(torch.float16).to(torch.float32)


@functools.cache
def _table(name: str, L: int, V: int, seed: int, q: int) -> torch.Tensor:
    states = torch.arange(1 << L, dtype=torch.int64)
    if name == "1mad":
        t = one_mad(states)[:, None]
    elif name == "3inst":
        t = three_inst(states)[:, None]
    elif name == "hyb":
        return hyb(states, hyb_lut(q, seed))  # the table itself is normalized
    else:
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(1 << L, V, generator=g)
    return t / t.square().mean(0).sqrt()


def code_table(name: str, L: int, V: int | None = None, *, seed: int = 0, q: int = 9) -> torch.Tensor:
    """All 2^L codewords (2^L × V float32), normalized to unit RMS per coordinate.

    The table is what the Viterbi search scores; decoding a stored stream indexes it (a GPU
    kernel would compute the same values from the state instead).
    """
    v = code_dims(name) if V is None else V
    check_code(name, v)
    return _table(name, L, v, seed, q)
