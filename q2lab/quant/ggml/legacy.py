"""32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.

These are what llama.cpp falls back to when a row length is not a multiple of 256 (SmolLM2's
576, Gemma 3's 640): Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, IQ types → IQ4_NL.
"""

from __future__ import annotations

from typing import ClassVar

import gguf.quants as gq
import numpy as np

from q2lab.quant.ggml.fp import F32, first_max, first_max_abs, first_min, safe_recip, seqsum
from q2lab.quant.ggml.search import best_index_int8, make_qkx_quants, make_qx_quants
from q2lab.quant.ggml.types import GGMLType, fp16_bytes, group_major, half, join, position_major, split


def row_sigma2(x: np.ndarray) -> np.ndarray:
    """Σx²/n over each whole row of (R, nb, bs): the weight floor of the imatrix paths, (R,)."""
    rows = np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    return seqsum(rows * rows) / F32(rows.shape[0])


def block_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """llama.cpp's ``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` with the row's sigma2, position-major."""
    bs = x.shape[-1]
    sigma2 = np.broadcast_to(row_sigma2(x)[:, None, None], x.shape)
    w = np.broadcast_to(qw, x.shape) * np.sqrt(sigma2 + x * x)
    return position_major(w, bs)


def pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """(G, 32) levels < 16 → (G, 16): low nibble = first half, high nibble = second half."""
    lv = levels.astype(np.uint8)
    return lv[..., :16] | (lv[..., 16:] << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack_high_bits(levels: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 levels → a little-endian uint32 as 4 bytes (Q5_0/Q5_1 ``qh``)."""
    bits = (levels.astype(np.uint8) >> 4) & 1
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=-1, bitorder="little")


def roundf(v: np.ndarray) -> np.ndarray:
    """C's ``roundf``: round half away from zero (exact: the fractional part is exact)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0))


def _trunc_levels(v: np.ndarray, hi: int) -> np.ndarray:
    """C's ``MIN(hi, (int8_t)(v))`` / ``(uint8_t)(v)``: truncation toward zero."""
    return np.minimum(np.trunc(v).astype(np.int32), hi)


def _symmetric(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: ``d = max/-nmax`` and truncating rounding, or ``make_qx_quants`` with an imatrix."""
    bs = x.shape[-1]
    g = position_major(x, bs)
    if qw is None:
        _, mx = first_max_abs(g)
        d = mx / F32(-nmax)
        levels = _trunc_levels(g * safe_recip(d) + F32(nmax + 0.5), 2 * nmax - 1)
    else:
        d, levels = make_qx_quants(g, nmax, block_weights(x, qw))
    return d, group_major(levels)


def _affine(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: min/max reference rounding, or ``make_qkx3_quants`` with an importance matrix."""
    bs = x.shape[-1]
    g = position_major(x, bs)
    if qw is None:
        mn, mx = first_min(g), first_max(g)
        d = (mx - mn) / F32(nmax)
        v = (g - mn) * safe_recip(d) + F32(0.5)
        levels = np.minimum(np.trunc(v).astype(np.int32), 255 if nmax == 31 else nmax)
        return d, mn, group_major(levels)
    d, the_min, levels = make_qkx_quants(
        g, block_weights(x, qw), nmax, -0.9, 0.05, 36, False, strict_flat=False
    )
    return d, -the_min, group_major(levels)


class _Legacy(GGMLType):
    """Q4_0/Q4_1/Q5_0/Q5_1: 32 levels of ``bits`` bits (low nibbles in ``qs``, bit 4 in ``qh``),
    an fp16 scale, and for the affine types an fp16 min; symmetric types store level + 2^(bits-1)."""

    bits: ClassVar[int]
    affine: ClassVar[bool]

    @classmethod
    def _quantize(cls, x, qw):
        if cls.affine:
            d, m, levels = _affine(x, qw, (1 << cls.bits) - 1)
            parts = {"d": fp16_bytes(d), "m": fp16_bytes(m)}
        else:
            d, levels = _symmetric(x, qw, 1 << (cls.bits - 1))
            parts = {"d": fp16_bytes(d)}
        if cls.bits == 5:
            parts["qh"] = pack_high_bits(levels)
        parts["qs"] = pack_nibbles(levels & 0x0F)
        return join(parts, cls.layout, x.shape[:2])

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        q = unpack_nibbles(p["qs"])
        if cls.bits == 5:
            q = q | (unpack_high_bits(p["qh"]) << 4)
        if cls.affine:
            return half(p["d"]) * q.astype(F32) + half(p["m"])
        return half(p["d"]) * (q.astype(np.int8) - np.int8(1 << (cls.bits - 1))).astype(F32)


class Q4_0(_Legacy):
    name = "Q4_0"
    layout = (("d", 2), ("qs", 16))
    summary = "4-bit symmetric, fp16 scale per 32 (4.5 bpw)"
    bits, affine = 4, False


class Q4_1(_Legacy):
    name = "Q4_1"
    layout = (("d", 2), ("m", 2), ("qs", 16))
    summary = "4-bit asymmetric, fp16 scale and min per 32 (5.0 bpw)"
    bits, affine = 4, True


class Q5_0(_Legacy):
    name = "Q5_0"
    layout = (("d", 2), ("qh", 4), ("qs", 16))
    summary = "5-bit symmetric, fp16 scale per 32 (5.5 bpw)"
    bits, affine = 5, False


class Q5_1(_Legacy):
    name = "Q5_1"
    layout = (("d", 2), ("m", 2), ("qh", 4), ("qs", 16))
    summary = "5-bit asymmetric, fp16 scale and min per 32 (6.0 bpw)"
    bits, affine = 5, True


class Q8_0(GGMLType):
    name = "Q8_0"
    layout = (("d", 2), ("qs", 32))
    summary = "8-bit symmetric, fp16 scale per 32 (8.5 bpw); ignores the importance matrix"

    @classmethod
    def _quantize(cls, x, qw):
        amax = np.abs(x).max(axis=-1)
        d = amax / F32(127)
        q = roundf(x * safe_recip(d)[..., None])
        return join({"d": fp16_bytes(d), "qs": q.astype(np.int8)}, cls.layout, x.shape[:2])

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        return np.ascontiguousarray(p["qs"]).view(np.int8).astype(F32) * half(p["d"])


class IQ4_NL(GGMLType):
    name = "IQ4_NL"
    layout = (("d", 2), ("qs", 16))
    summary = "4-bit non-linear (16-entry table), fp16 scale per 32 (4.5 bpw)"

    @staticmethod
    def values() -> np.ndarray:
        """The non-linear grid, taken from the installed gguf package."""
        return np.asarray(gq.IQ4_NL.kvalues, dtype=np.int8)

    @classmethod
    def _quantize(cls, x, qw):
        r, nb, bs = x.shape
        g = position_major(x, bs)
        if qw is None:
            w = g * g
        else:
            sigma2 = seqsum(g * g) * (F32(2) / F32(bs))
            w = position_major(np.broadcast_to(qw, x.shape), bs) * np.sqrt(sigma2 + g * g)
        d, levels = iq4nl_search(g, w, cls.values(), ntry=7)
        return join({"d": fp16_bytes(d), "qs": pack_nibbles(group_major(levels))}, cls.layout, (r, nb))

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        vals = cls.values().astype(F32)
        return half(p["d"]) * vals[unpack_nibbles(p["qs"])]


def iq4nl_search(
    g: np.ndarray, w: np.ndarray, values: np.ndarray, ntry: int
) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_iq4_nl_impl`` for single-block super-blocks: scale search over 2·ntry+1 tries."""
    vals = values.astype(F32)
    amax, mx = first_max_abs(g)
    live = ~(amax < F32(1e-15))
    mx = np.where(live, mx, F32(1))
    d = -mx / vals[0] if ntry > 0 else mx / vals[0]
    inv = F32(1) / d

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = best_index_int8(values, iscale * g)
        q = vals[lv]
        wq = w * q
        return lv, seqsum(wq * g), seqsum(wq * q)

    _, sumqx, sumq2 = trial(inv)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            iscale = F32(itry + int(values[0])) / mx
            _, sumqx, sumq2 = trial(iscale)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            nd = sumqx / np.where(better, sumq2, F32(1))
            d = np.where(better, nd, d)
            best = np.where(better, nd * sumqx, best)
    d = np.where(live, d, F32(0)).astype(F32)
    if ntry > 0:
        levels = best_index_int8(values, safe_recip(d) * g)
    else:
        levels = best_index_int8(values, inv * g)
    return d, levels
