"""IQ2 i-quants (IQ2_XXS, IQ2_XS, IQ2_S): 8-weight groups snapped to a lattice codebook.

Each group of 8 magnitudes is coded as one entry of a grid of 256 / 512 / 1024 points whose
coordinates are levels 0‥2 (values 1, 3, 5 times the sub-block scale), plus 7 or 8 sign bits;
sub-blocks of 32 (XXS) or 16 (XS, S) weights share a 4-bit scale under one fp16 super-scale.

The search is ``quantize_row_iq2_{xxs,xs,s}_impl`` from ``ggml-quants.c``, reproduced bit for bit
and vectorised: for every candidate scale all sub-blocks are rounded at once, the groups that
land on the grid are looked up in a dense map, and the rest pick their best neighbour from
padded neighbour lists in one gather.  The grids are the published tables shipped in the gguf
package (``gguf.quants.IQ2_*.grid_hex``); the neighbour lists are derived from them exactly as
``iq2xs_init_impl`` does (nearest points by squared distance, ties by index).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import gguf.quants as gq
import numpy as np

from q2lab.quant.ggml.fp import F32, nearest_int, running_max, seqsum
from q2lab.quant.ggml.kquants import scales_pm, sigma2, sub_weights
from q2lab.quant.ggml.search import make_qp_quants
from q2lab.quant.ggml.types import QK_K, GGMLType, fp16_bytes, half, join, position_major, split

# grid → (weights per group, key bits per level, highest level a search produces, distances kept)
_GRIDS = {"IQ2_XXS": (8, 2, 2, 2), "IQ2_XS": (8, 2, 2, 2), "IQ2_S": (8, 2, 2, 1), "IQ3_S": (4, 3, 7, 3)}


@dataclass(frozen=True)
class Codebook:
    """A grid with its dense key → index map and padded neighbour lists (``-1`` pads)."""

    levels: np.ndarray  # (P, group) int8 levels 0‥top
    kmap: np.ndarray  # (M,) int32: grid index of a key, -1 when off the grid
    neighbours: np.ndarray  # (M, K) int32 for off-grid keys, ordered by (distance, index)
    lengths: np.ndarray  # (M,) number of neighbours of each key
    qvalues: np.ndarray  # (group, P) float32 grid values 2l + 1, position-major for gathers
    pow: np.ndarray  # (group,) int64: level i of a group sits at bits (key bits)·i of its key
    top: int  # highest level the rounding produces

    @property
    def group(self) -> int:
        return len(self.pow)


@functools.cache
def codebook(type_name: str) -> Codebook:
    """The codebook of an IQ2/IQ3 type from gguf's published grid; neighbours as llama.cpp builds them.

    (``iq2xs_init_impl`` / ``iq3xs_init_impl``: for every key off the grid, all grid points
    within the ``nwant`` smallest distinct squared distances, ordered by distance then index.)
    """
    group, bits, top, nwant = _GRIDS[type_name]
    pw = (2 ** (bits * np.arange(group))).astype(np.int64)
    cls = getattr(gq, type_name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(-1, group)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values).astype(np.int8)
    keys = levels.astype(np.int64) @ pw
    kmap = np.full(int(top * pw.sum()) + 1, -1, dtype=np.int32)
    kmap[keys] = np.arange(len(keys), dtype=np.int32)
    # every key with levels ≤ top (the only ones a search can produce); others keep no list
    base = top + 1
    all_levels = (np.arange(base**group)[:, None] // (base ** np.arange(group))[None, :]) % base
    all_keys = all_levels @ pw
    off = kmap[all_keys] < 0
    q, pos = 2 * levels.astype(np.int64) + 1, 2 * all_levels[off] + 1
    d2 = (pos * pos).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2 * pos @ q.T  # (U, P) exact ints
    order = np.argsort(d2 * 4096 + np.arange(len(q)), axis=1)  # by distance, ties by index
    d2s = np.take_along_axis(d2, order, axis=1)
    distinct = np.concatenate([np.ones((len(d2s), 1), bool), d2s[:, 1:] != d2s[:, :-1]], axis=1)
    keep = np.cumsum(distinct, axis=1) <= nwant
    width = int(keep.sum(1).max())
    lists = np.where(keep[:, :width], order[:, :width], -1).astype(np.int32)
    neighbours = np.full((len(kmap), width), -1, dtype=np.int32)
    neighbours[all_keys[off]] = lists
    lengths = (neighbours >= 0).sum(axis=1)
    qvalues = np.ascontiguousarray((2 * levels.astype(np.float32) + 1).T)
    return Codebook(levels, kmap, neighbours, lengths, qvalues, pw, top)


def group_keys(cb: Codebook, levels: np.ndarray) -> np.ndarray:
    """(S, G) levels → (S/group, G) keys ``Σ l_i << bits·i`` of the groups."""
    s, g = levels.shape
    n = cb.group
    return np.tensordot(cb.pow, levels.reshape(s // n, n, g).astype(np.int64), axes=([0], [1]))


def snap(
    cb: Codebook, levels: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray, todo: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Put every group with ``todo`` on the grid (``iq2_find_best_neighbour`` for the off-grid ones).

    ``levels``/``xval``/``waux`` are (S, G), ``scale`` (G,), ``todo`` (S/8, G).  Returns the new
    levels and whether each group was on the grid already.
    """
    s, g = levels.shape
    n = cb.group
    all_keys = group_keys(cb, levels)
    on = cb.kmap[all_keys] >= 0
    k_idx, g_idx = np.nonzero(todo & ~on)
    if k_idx.size:
        keys = all_keys[k_idx, g_idx]
        xo = xval.reshape(s // n, n, g)[k_idx, :, g_idx]  # (M, group)
        wo = waux.reshape(s // n, n, g)[k_idx, :, g_idx]
        sc = scale[g_idx][:, None]
        best = np.empty(len(keys), dtype=np.int64)
        lens = cb.lengths[keys]
        lo = 0
        for width in (4, 8, 16, 32, 64, 128, 256, 512):  # lists padded per bucket, not to the longest
            sel = np.nonzero((lens > lo) & (lens <= width))[0]
            lo = width
            if sel.size:
                best[sel] = _best_neighbour(cb, keys[sel], xo[sel], wo[sel], sc[sel], width)
        lv = levels.reshape(s // n, n, g).copy()
        lv[k_idx, :, g_idx] = cb.levels[best]
        levels = lv.reshape(s, g)
    return levels, on


def _best_neighbour(cb: Codebook, keys, xo, wo, sc, width: int) -> np.ndarray:
    """``iq2_find_best_neighbour``: the first listed point with the least ``Σ w·(s·q − x)²``."""
    cand = cb.neighbours[keys, :width]  # (M, width), -1 padded
    safe = np.maximum(cand, 0)
    d2 = np.zeros(cand.shape, dtype=F32)
    diff, term = np.empty_like(d2), np.empty_like(d2)
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(cb.group):  # d2 += w·diff·diff with diff = scale·q − x, in C's order, in place
            np.take(cb.qvalues[i], safe, out=diff)
            diff *= sc
            diff -= xo[:, i : i + 1]
            np.multiply(wo[:, i : i + 1], diff, out=term)
            term *= diff
            d2 += term
    d2[cand < 0] = np.inf
    return cand[np.arange(len(cand)), np.argmin(d2, axis=1)]


def qsums(w: np.ndarray, xval: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Σ w·x·q`` and ``Σ w·q²`` with ``q = 2l + 1``, summed in C's order."""
    q = (F32(2) * levels.astype(F32) + F32(1)).astype(F32)
    return seqsum(w * xval * q), seqsum(w * q * q)


def round_levels(xval: np.ndarray, iscale: np.ndarray, top: int) -> np.ndarray:
    """``clamp(nearest_int(0.5·(id·x − 1)), 0, top)``."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.clip(nearest_int(F32(0.5) * (iscale * xval - F32(1))), 0, top)


class _IQ2(GGMLType):
    """Shared lattice search of the IQ2 types and IQ3_S; subclasses set the knobs and the bit layout."""

    sub: ClassVar[int]  # weights per sub-block (one 4-bit scale)
    parity: ClassVar[bool]  # signs stored with 7 bits: flip the least important one to even parity
    eps: ClassVar[float]
    doubled_sigma: ClassVar[bool]
    center: ClassVar[int] = 5  # candidate inverse scales (center + step·k)/max, k = -9‥9
    step: ClassVar[float] = 0.1
    ongrid_start: ClassVar[bool] = True  # C's is_on_grid before the first accepted candidate
    requires_imatrix = True

    @classmethod
    def _quantize(cls, x, qw):
        """Lattice search, super-block scales, then the type's own bit layout (:meth:`_pack`)."""
        r, nb, _ = x.shape
        scale, signs, idx = cls._search(x, qw)
        d, codes, max_scale = cls._super_scales(scale)
        return join(cls._pack(x, idx, signs, d, codes, max_scale), cls.layout, (r, nb))

    @classmethod
    def _pack(cls, x, idx, signs, d, codes, max_scale) -> dict[str, np.ndarray]:
        """Block fields (name → bytes per block) from grid indices, signs and scales (``x``: the
        blocks, for types whose layout depends on them)."""
        raise NotImplementedError

    @classmethod
    def _weights(cls, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        """Per-weight importance, position-major (sub, G)."""
        s = cls.sub
        if qw is None:  # only IQ2_S has a reference path
            s2 = np.broadcast_to(sigma2(x, doubled=True).reshape(x.shape[0], x.shape[1], 1), x.shape)
            return position_major(F32(0.25) * s2 + x * x, s)
        return sub_weights(x, qw, sigma2(x, doubled=cls.doubled_sigma), s)

    @classmethod
    def _search(cls, x: np.ndarray, qw: np.ndarray | None):
        """Per sub-block: scale (G,), levels (S, G), group signs (S/8, G), group grid index (S/group, G)."""
        cb = codebook(cls.name)
        s = cls.sub
        g = position_major(x, s)
        w = cls._weights(x, qw)
        waux = np.sqrt(w)
        neg = ~(g >= 0)
        xval = np.where(neg, -g, g)
        negs = neg.reshape(s // 8, 8, -1)
        signs = (negs.astype(np.int32) << np.arange(8).reshape(1, 8, 1)).sum(axis=1)
        if cls.parity:
            odd = negs.sum(axis=1) % 2 == 1
            imin = np.argmin((w * g * g).reshape(negs.shape), axis=1)  # first minimum of w·x·x
            xv = xval.reshape(negs.shape)
            kk, gg = np.nonzero(odd)
            xv[kk, imin[kk, gg], gg] = -xv[kk, imin[kk, gg], gg]
            signs = (signs ^ (odd.astype(np.int32) << imin)) & 127
        mx = xval.max(axis=0)
        live = ~(mx < F32(cls.eps))
        levels = np.zeros(g.shape, dtype=np.int32)
        groups = (s // cb.group, g.shape[1])
        ongrid = np.full(groups, cls.ongrid_start)
        everywhere = np.ones(groups, dtype=bool)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if cls.parity and cls.sub == 32:  # IQ2_XXS: start from make_qp_quants' scale
                scale, _ = make_qp_quants(xval, 4, w)
                base = scale * F32(3)
                live &= ~(base <= 0)
                tries = range(-6, 7)
            else:
                base = mx
                scale = mx / F32(cls.center)
                tries = range(-9, 10)
            base = np.where(live, base, F32(1))
            best = np.zeros_like(scale)
            for step in tries:
                iscale = (F32(cls.center) + F32(step) * F32(cls.step)) / base
                rounded = round_levels(xval, iscale, cb.top)
                trial, on = snap(cb, rounded, xval, waux, F32(1) / iscale, everywhere)
                sumqx, sumq2 = qsums(w, xval, trial)
                better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale)
                best = np.where(better, scale * sumqx, best)
                levels = np.where(better, trial, levels)
                ongrid = np.where(better, on, ongrid)
            levels, scale = cls._refine(cb, levels, xval, waux, w, scale, ongrid)
        flip = scale < 0
        scale = np.where(flip, -scale, scale)
        signs = np.where(flip, ~signs & (127 if cls.parity else 255), signs)
        idx = cb.kmap[group_keys(cb, levels)]
        if np.any(live & (idx < 0).any(axis=0)):
            raise RuntimeError(f"{cls.name}: a group ended off the grid (llama.cpp aborts here too)")
        scale = np.where(live, scale, F32(0))
        dead = ~live
        return scale, np.where(dead, 0, signs), np.where(dead, 0, np.maximum(idx, 0))

    @classmethod
    def _refine_groups(cls, ongrid: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Which groups the best scale re-rounds (XXS: all; XS/S: those off the grid)."""
        if cls.sub == 32:
            return np.broadcast_to(scale > 0, ongrid.shape)
        return ~ongrid & (~ongrid).any(axis=0) & (scale > 0)

    @classmethod
    def _refine(cls, cb, levels, xval, waux, w, scale, ongrid):
        """Re-round with the best scale the groups :meth:`_refine_groups` picks; refit the scale."""
        todo = cls._refine_groups(ongrid, scale)
        do = todo.any(axis=0)
        safe = np.where(do, scale, F32(1))
        fresh = round_levels(xval, F32(1) / safe, cb.top)
        rounded = np.where(np.repeat(todo, cb.group, axis=0), fresh, levels)
        new, _ = snap(cb, rounded, xval, waux, safe, todo)
        sumqx, sumq2 = qsums(w, xval, new)
        upd = do & (sumq2 > 0)
        scale = np.where(upd, sumqx / np.where(upd, sumq2, F32(1)), scale)
        return np.where(do, new, levels), scale

    @classmethod
    def _super_scales(cls, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sub-block scales (G,) → super-scale d (S,), 4-bit codes (count, S), and max_scale (S,)."""
        sc = scales_pm(scale, QK_K // cls.sub)
        max_scale = running_max(sc)
        live = max_scale != 0
        d = np.where(live, max_scale / F32(31), F32(0))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iscale = F32(1) / np.where(live, d, F32(1))
            codes = np.clip(nearest_int(F32(0.5) * (iscale * sc - F32(1))), 0, 15)
        return d, np.where(live, codes, 0), max_scale

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, scales, idx, signs = cls._fields(blocks)
        grid = codebook(cls.name).levels[idx].astype(F32)  # (N, groups, 8)
        values = np.asarray(getattr(gq, cls.name).grid_map, dtype=F32)[grid.astype(np.int64)]
        db = (d * (F32(0.5) + scales.astype(F32)) * F32(0.25))[:, :, None, None]
        bits = (signs[..., None] >> np.arange(8, dtype=np.uint8)) & 1
        sgn = np.where(bits == 0, F32(1), F32(-1))
        per = cls.sub // 8
        n = blocks.shape[0]
        return (db * values.reshape(n, -1, per, 8) * sgn.reshape(n, -1, per, 8)).reshape(n, QK_K)


def _ksigns(signs7: np.ndarray) -> np.ndarray:
    """7 stored sign bits → 8 with even parity (the eighth bit is the parity of the seven)."""
    s = signs7.astype(np.uint8)
    parity = np.unpackbits(s[..., None], axis=-1).sum(axis=-1) % 2
    return s | (parity.astype(np.uint8) << 7)


class IQ2_XXS(_IQ2):
    name = "IQ2_XXS"
    layout = (("d", 2), ("qs", 64))
    summary = "8-weight groups on a 256-point lattice + 7 sign bits, 4-bit scale per 32 (2.0625 bpw)"
    sub, parity, eps, doubled_sigma = 32, True, 1e-15, False
    reference_path = False

    @classmethod
    def _pack(cls, x, idx, signs, d, codes, max_scale):
        idx, signs = idx.T.astype(np.uint32), signs.T.astype(np.uint32)  # (G, 4)
        w0 = idx[:, 0] | (idx[:, 1] << 8) | (idx[:, 2] << 16) | (idx[:, 3] << 24)
        w1 = signs[:, 0] | (signs[:, 1] << 7) | (signs[:, 2] << 14) | (signs[:, 3] << 21)
        w1 = w1 | (codes.T.reshape(-1).astype(np.uint32) << 28)
        qs = np.stack([w0, w1], axis=-1).reshape(-1, 16)
        qs = np.where((max_scale != 0)[:, None], qs, 0).astype("<u4")
        return {"d": fp16_bytes(d), "qs": qs.view(np.uint8)}

    @classmethod
    def _fields(cls, blocks):
        p = split(blocks, cls.layout)
        qs = np.ascontiguousarray(p["qs"]).view("<u4").reshape(-1, 8, 2)
        idx = np.ascontiguousarray(qs[..., 0]).view(np.uint8).reshape(-1, 32)
        signs = (qs[..., 1:2] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 0x7F
        return half(p["d"]), qs[..., 1] >> 28, idx, _ksigns(signs.reshape(-1, 32))


class IQ2_XS(_IQ2):
    name = "IQ2_XS"
    layout = (("d", 2), ("qs", 64), ("scales", 8))
    summary = "8-weight groups on a 512-point lattice + 7 sign bits, 4-bit scale per 16 (2.3125 bpw)"
    sub, parity, eps, doubled_sigma = 16, True, 1e-15, False
    reference_path = False

    @classmethod
    def _pack(cls, x, idx, signs, d, codes, max_scale):
        q = (idx.T | (signs.T << 9)).astype("<u2").reshape(-1, 32)
        q = np.where((max_scale != 0)[:, None], q, 0).astype("<u2")
        c = codes.T.astype(np.uint8)  # (S, 16)
        return {"d": fp16_bytes(d), "qs": q.view(np.uint8), "scales": c[:, 0::2] | (c[:, 1::2] << 4)}

    @classmethod
    def _fields(cls, blocks):
        p = split(blocks, cls.layout)
        qs = np.ascontiguousarray(p["qs"]).view("<u2")
        sc = p["scales"]
        scales = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(-1, 16)
        return half(p["d"]), scales, qs & 511, _ksigns(qs >> 9)


class IQ2_S(_IQ2):
    name = "IQ2_S"
    layout = (("d", 2), ("qs", 32), ("signs", 32), ("qh", 8), ("scales", 8))
    summary = "8-weight groups on a 1024-point lattice + 8 sign bits, 4-bit scale per 16 (2.5625 bpw)"
    sub, parity, eps, doubled_sigma = 16, False, 1e-8, True

    @classmethod
    def _pack(cls, x, idx, signs, d, codes, max_scale):
        idx = idx.T.reshape(-1, 32)
        hi = (idx >> 8).reshape(-1, 8, 4) << np.array([0, 2, 4, 6])
        c = codes.T.astype(np.uint8)
        return {
            "d": fp16_bytes(d * F32(0.9875)),
            "qs": (idx & 255).astype(np.uint8),
            "signs": signs.T.reshape(-1, 32).astype(np.uint8),
            "qh": hi.sum(axis=-1).astype(np.uint8),
            "scales": c[:, 0::2] | (c[:, 1::2] << 4),
        }

    @classmethod
    def _fields(cls, blocks):
        p = split(blocks, cls.layout)
        sc = p["scales"]
        scales = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(-1, 16)
        qh = (p["qh"][..., None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
        idx = p["qs"].astype(np.int64) | (qh.reshape(-1, 32).astype(np.int64) << 8)
        return half(p["d"]), scales, idx, np.ascontiguousarray(p["signs"])
