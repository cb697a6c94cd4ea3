"""K-quants: 256-weight super-blocks with quantized sub-block scales (Q2_K … Q6_K).

Each super-block is split into sub-blocks (16 weights for Q2_K/Q3_K/Q6_K, 32 for Q4_K/Q5_K)
that each get a float scale (and min) from one of ggml's searches; the sub-block scales are
then quantized against one fp16 super-block scale, and the weights are re-rounded with the
scales actually stored.  Without an importance matrix this is ``quantize_row_qN_K_ref``; with
one it is ``quantize_row_qN_K_impl`` (importance-weighted errors, ``make_qp_quants`` for the
scales), exactly as ``llama_model_quantize`` chooses.
"""

from __future__ import annotations

import numpy as np

from q2lab.quant.ggml.fp import F32, first_max_abs, fp16_round, nearest_int, running_max, seqsum
from q2lab.quant.ggml.search import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants
from q2lab.quant.ggml.types import QK_K, GGMLType, fp16_bytes, group_major, half, join, position_major, split


def sigma2(x: np.ndarray, doubled: bool) -> np.ndarray:
    """Σx²/256 (Q2_K, IQ2) or 2·Σx²/256 (Q3_K … Q5_K) per super-block of (R, nb, 256), shape (S,)."""
    g = position_major(x, QK_K)
    s = seqsum(g * g)
    return (F32(2) * s if doubled else s) / F32(QK_K)


def sub_weights(x: np.ndarray, qw: np.ndarray, s2: np.ndarray, size: int) -> np.ndarray:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` for every sub-block, position-major (size, G)."""
    r, nb, _ = x.shape
    s2 = np.broadcast_to(s2.reshape(r, nb, 1), x.shape)
    return position_major(np.broadcast_to(qw, x.shape) * np.sqrt(s2 + x * x), size)


def per_sub(v: np.ndarray, count: int) -> np.ndarray:
    """A per-super-block value (S,) repeated for its ``count`` sub-blocks → (S·count,)."""
    return np.repeat(v, count)


def scales_pm(v: np.ndarray, count: int) -> np.ndarray:
    """Per-sub-block values (S·count,) → position-major (count, S) for the second-level search."""
    return np.ascontiguousarray(v.reshape(-1, count).T)


def requantize(
    x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int
) -> np.ndarray:
    """Re-round sub-blocks (n, G) with their stored scales: ``nearest_int((x + dm)/d)`` where ``d != 0``.

    Sub-blocks whose stored scale is zero keep the levels of the search (C's ``continue``).
    """
    ok = d != 0
    safe = np.where(ok, d, F32(1))
    v = x + dm if dm is not None else x
    with np.errstate(over="ignore", invalid="ignore"):
        new = np.clip(nearest_int(v / safe), lo, hi)
    return np.where(ok, new, levels)


def pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(G, 256) levels < 4 → (G, 64): byte j/4+l holds L[j+l], L[j+l+32], L[j+l+64], L[j+l+96]."""
    lv = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)).reshape(-1, 64)


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins → the 12 bytes of Q4_K/Q5_K (``get_scale_min_k4`` inverse)."""
    ls = ls.astype(np.uint8).reshape(-1, 8)
    lm = lm.astype(np.uint8).reshape(-1, 8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def unpack_scales_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = sc.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    ls = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    lm = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return ls, lm


def pack_scales_q3(l6: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit Q3_K scales (already +32) → 12 bytes."""
    lv = l6.astype(np.uint8).reshape(-1, 16)
    low = lv & 0x0F
    out = np.zeros((lv.shape[0], 12), dtype=np.uint8)
    out[:, :8] = low[:, :8] | (low[:, 8:] << 4)
    high = (lv >> 4).reshape(-1, 4, 4)  # [j//4, j%4]
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def unpack_scales_q3(sc: np.ndarray) -> np.ndarray:
    low = np.concatenate([sc[:, :8] & 0x0F, sc[:, :8] >> 4], axis=-1)
    hb = sc[:, 8:12]
    high = np.concatenate([(hb >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    return (low | (high << 4)).astype(np.int16) - 32


def _u8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to ``uint8_t`` (modulo 256)."""
    return (np.asarray(v) & 0xFF).astype(np.int32)


# ---------------------------------------------------------------------------------- Q2_K
class Q2_K(GGMLType):
    name = "Q2_K"
    layout = (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))
    summary = "2-bit levels with 4-bit scale and min per 16, fp16 super-scales per 256 (2.625 bpw)"

    @classmethod
    def _quantize(cls, x, qw):
        r, nb, _ = x.shape
        g = position_major(x, 16)
        if qw is None:
            scales, mins, levels = make_qkx_quants(g, np.abs(g), 3, -0.5, 0.1, 15, True, strict_flat=True)
            scales, mins = scales_pm(scales, 16), scales_pm(mins, 16)
            max_scale, max_min = running_max(scales), running_max(mins)
            ls = np.where(max_scale > 0, nearest_int(F32(15) / _nz(max_scale) * scales), 0)
            lm = np.where(max_min > 0, nearest_int(F32(15) / _nz(max_min) * mins), 0)
            d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
            dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
        else:
            w = sub_weights(x, qw, sigma2(x, doubled=False), 16)
            sw = scales_pm(seqsum(w), 16)
            scales, mins, levels = make_qkx_quants(g, w, 3, -0.9, 0.05, 36, False, strict_flat=False)
            d, ls = make_qp_quants(scales_pm(scales, 16), 15, sw)
            dmin, lm = make_qp_quants(scales_pm(mins, 16), 15, sw)
        sc = _u8(_u8(ls) | (lm << 4))  # (16, S)
        dj = (fp16_round(d) * (sc & 0xF).astype(F32)).T.reshape(-1)
        mj = (fp16_round(dmin) * (sc >> 4).astype(F32)).T.reshape(-1)
        levels = group_major(requantize(g, levels, dj, mj, 0, 3)).reshape(-1, QK_K)
        parts = {
            "scales": group_major(sc).astype(np.uint8),
            "qs": pack_2bit(levels),
            "d": fp16_bytes(d),
            "dmin": fp16_bytes(dmin),
        }
        return join(parts, cls.layout, (r, nb))

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        sc = p["scales"]
        dl = (half(p["d"]) * (sc & 0xF).astype(F32))[:, :, None]
        ml = (half(p["dmin"]) * (sc >> 4).astype(F32))[:, :, None]
        q = unpack_2bit(p["qs"]).reshape(-1, 16, 16).astype(F32)
        return (dl * q - ml).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------- Q3_K
class Q3_K(GGMLType):
    name = "Q3_K"
    layout = (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))
    summary = "3-bit levels with 6-bit scale per 16, fp16 super-scale per 256 (3.4375 bpw)"

    @classmethod
    def _quantize(cls, x, qw):
        r, nb, _ = x.shape
        g = position_major(x, 16)
        if qw is None:
            scales, levels = make_q3_quants(g, 4)
            scales = scales_pm(scales, 16)
            _, max_scale = first_max_abs(scales)
            live = max_scale != 0
            iscale = F32(-32) / np.where(live, max_scale, F32(1))
            l6 = np.where(live, np.clip(_i8(nearest_int(iscale * scales)), -32, 31) + 32, 0)
            d = np.where(live, F32(1) / iscale, F32(0))
        else:
            w = sub_weights(x, qw, sigma2(x, doubled=True), 16)
            sw = scales_pm(seqsum(w), 16)
            scales, levels = make_qx_quants(g, 4, w)
            d, l6 = make_qx_quants(scales_pm(scales, 16), 32, sw)
        dj = (fp16_round(d) * (l6 - 32).astype(F32)).T.reshape(-1)
        levels = requantize(g, levels, dj, None, -4, 3) + ((dj != 0).astype(np.int32) << 2)
        levels = group_major(levels.astype(np.uint8)).reshape(-1, 8, 32)  # 0‥7
        high = levels >> 2  # bit 2 → hmask bit j of byte l holds level 32j + l
        hmask = high[:, 0] | (high[:, 1] << 1)
        for j in range(2, 8):
            hmask |= high[:, j] << j
        parts = {
            "hmask": hmask,
            "qs": pack_2bit((levels & 3).reshape(-1, QK_K)),
            "scales": pack_scales_q3(group_major(l6)),
            "d": fp16_bytes(d),
        }
        return join(parts, cls.layout, (r, nb))

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        scales = unpack_scales_q3(p["scales"]).astype(np.int8).astype(F32)
        dl = (half(p["d"]) * scales)[:, :, None]
        low = unpack_2bit(p["qs"]).astype(np.int8)
        hbit = np.unpackbits(p["hmask"][:, None, :], axis=1, count=8, bitorder="little").reshape(-1, QK_K)
        q = (low - ((hbit ^ 1) << 2).astype(np.int8)).astype(F32).reshape(-1, 16, 16)
        return (dl * q).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------- Q4_K / Q5_K
class _QK45(GGMLType):
    """Shared logic of Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins."""

    nmax: int
    ref_search: tuple[float, float, int]  # rmin, rdelta, nstep of make_qkx2_quants
    clamp_impl_scales: bool

    @classmethod
    def _levels(cls, x, qw):
        g = position_major(x, 32)
        if qw is None:
            av_x = np.sqrt(seqsum(g * g) / F32(32))
            w = av_x + np.abs(g)
            rmin, rdelta, nstep = cls.ref_search
            scales, mins, levels = make_qkx_quants(
                g, w, cls.nmax, rmin, rdelta, nstep, False, strict_flat=True
            )
            scales, mins = scales_pm(scales, 8), scales_pm(mins, 8)
            max_scale, max_min = running_max(scales), running_max(mins)
            inv_s = np.where(max_scale > 0, F32(63) / _nz(max_scale), F32(0))
            inv_m = np.where(max_min > 0, F32(63) / _nz(max_min), F32(0))
            ls = np.minimum(_u8(nearest_int(inv_s * scales)), 63)
            lm = np.minimum(_u8(nearest_int(inv_m * mins)), 63)
            d, dmin = max_scale / F32(63), max_min / F32(63)
        else:
            w = sub_weights(x, qw, sigma2(x, doubled=True), 32)
            sw = scales_pm(seqsum(w), 8)
            scales, mins, levels = make_qkx_quants(g, w, cls.nmax, -0.9, 0.05, 36, False, strict_flat=False)
            d, ls = make_qp_quants(scales_pm(scales, 8), 63, sw)
            dmin, lm = make_qp_quants(scales_pm(mins, 8), 63, sw)
            ls, lm = _u8(ls), _u8(lm)
            if cls.clamp_impl_scales:
                ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        dj = (fp16_round(d) * ls.astype(F32)).T.reshape(-1)
        mj = (fp16_round(dmin) * lm.astype(F32)).T.reshape(-1)
        levels = group_major(requantize(g, levels, dj, mj, 0, cls.nmax)).reshape(-1, QK_K)
        return d, dmin, group_major(ls), group_major(lm), levels

    @staticmethod
    def _scale_rows(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ls, lm = unpack_scales_k4(p["scales"])
        d = (half(p["d"]) * ls.astype(F32))[:, :, None]
        dm = (half(p["dmin"]) * lm.astype(F32))[:, :, None]
        return d, dm


class Q4_K(_QK45):
    name = "Q4_K"
    layout = (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))
    summary = "4-bit levels with 6-bit scale and min per 32, fp16 super-scales per 256 (4.5 bpw)"
    nmax = 15
    ref_search = (-1.0, 0.1, 20)
    clamp_impl_scales = False

    @classmethod
    def _quantize(cls, x, qw):
        r, nb, _ = x.shape
        d, dmin, ls, lm, levels = cls._levels(x, qw)
        lv = levels.astype(np.uint8).reshape(-1, 4, 2, 32)
        qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)
        parts = {"d": fp16_bytes(d), "dmin": fp16_bytes(dmin), "scales": pack_scales_k4(ls, lm), "qs": qs}
        return join(parts, cls.layout, (r, nb))

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        d, dm = cls._scale_rows(p)
        q = p["qs"].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (q & 0x0F).reshape(-1, 8, 32).astype(F32)
        return (d * q - dm).reshape(-1, QK_K)


class Q5_K(_QK45):
    name = "Q5_K"
    layout = (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))
    summary = "5-bit levels with 6-bit scale and min per 32, fp16 super-scales per 256 (5.5 bpw)"
    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    clamp_impl_scales = True

    @classmethod
    def _quantize(cls, x, qw):
        r, nb, _ = x.shape
        d, dmin, ls, lm, levels = cls._levels(x, qw)
        lv = levels.astype(np.uint8).reshape(-1, 4, 2, 32)  # [chunk of 64, half, j]
        high = (lv >> 4) & 1
        qh = np.zeros((lv.shape[0], 32), dtype=np.uint8)
        for k in range(4):
            qh |= (high[:, k, 0] << (2 * k)) | (high[:, k, 1] << (2 * k + 1))
        qs = ((lv[:, :, 0] & 0x0F) | ((lv[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
        parts = {
            "d": fp16_bytes(d),
            "dmin": fp16_bytes(dmin),
            "scales": pack_scales_k4(ls, lm),
            "qh": qh,
            "qs": qs,
        }
        return join(parts, cls.layout, (r, nb))

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        d, dm = cls._scale_rows(p)
        ql = p["qs"].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(-1, 8, 32)
        qh = p["qh"].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = (ql | ((qh & 1) << 4)).astype(F32)
        return (d * q - dm).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------- Q6_K
class Q6_K(GGMLType):
    name = "Q6_K"
    layout = (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))
    summary = "6-bit levels with 8-bit scale per 16, fp16 super-scale per 256 (6.5625 bpw)"

    @classmethod
    def _quantize(cls, x, qw):
        r, nb, _ = x.shape
        g = position_major(x, 16)
        w = None if qw is None else position_major(np.broadcast_to(qw, x.shape), 16)
        scales, levels = make_qx_quants(g, 32, w)
        scales = scales_pm(scales, 16)
        amax, max_scale = first_max_abs(scales)
        live = ~(amax < F32(1e-15))
        iscale = F32(-128) / np.where(live, max_scale, F32(1))
        d = np.where(live, F32(1) / iscale, F32(0))
        sc = np.where(live, np.minimum(nearest_int(iscale * scales), 127), 0)  # (16, S)
        dj = (fp16_round(d) * sc.astype(F32)).T.reshape(-1)
        levels = requantize(g, levels, dj, None, -32, 31)
        levels = group_major(np.where(dj != 0, levels + 32, levels)).reshape(-1, QK_K)
        levels = np.where(live[:, None], levels, 0)
        lv = levels.astype(np.uint8).reshape(-1, 2, 4, 32)  # [half of 128, quarter, l]
        low = lv & 0x0F
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
        hi = lv >> 4
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        parts = {
            "ql": ql.reshape(-1, 128),
            "qh": qh.reshape(-1, 64),
            "scales": group_major(sc).astype(np.int8),
            "d": fp16_bytes(d),
        }
        return join(parts, cls.layout, (r, nb))

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        scales = np.ascontiguousarray(p["scales"]).view(np.int8).astype(F32)
        d = (half(p["d"]) * scales)[:, :, None]
        ql = p["ql"].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(-1, 8, 32)
        qh = p["qh"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & 0x03).reshape(-1, 8, 32)
        q = ((ql | (qh << 4)).astype(np.int8) - np.int8(32)).reshape(-1, 16, 16).astype(F32)
        return (d * q).reshape(-1, QK_K)


def _nz(v: np.ndarray) -> np.ndarray:
    return np.where(v != 0, v, F32(1))


def _i8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to ``int8_t``."""
    return ((np.asarray(v) + 128) & 0xFF) - 128
