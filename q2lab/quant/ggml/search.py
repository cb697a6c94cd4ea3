"""ggml's per-group scale searches, vectorised across groups and bit-exact with the C code.

Each function takes a batch of groups position-major, ``x`` of shape (n, G) float32 (see
:mod:`q2lab.quant.ggml.fp`), and returns the chosen scale per group (G,) and the integer
levels ``L`` (n, G).  The C versions (``make_qx_quants``,
``make_q3_quants``, ``make_qkx2_quants``, ``make_qkx3_quants``, ``make_qp_quants`` and
``best_index_int8`` in ``ggml-quants.c``) run one group at a time; here every step runs on all
groups at once and only the loops whose order matters (candidate scales, coordinate-descent
passes over positions) remain, each a handful of array operations.  Groups that have already
converged keep being visited: with the same state they make the same (no) change, so the
result equals C's early exit.
"""

from __future__ import annotations

import functools

import numpy as np

from q2lab.quant.ggml.fp import (
    _MAGIC,
    F32,
    first_max,
    first_max_abs,
    first_min,
    nearest_int,
    safe_div,
    seqsum,
)

GROUP_MAX_EPS = F32(1e-15)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric levels in ``[0, 2·nmax)`` (``rmse_type = 1``): weights ``qw`` or ``x²``.

    Tries the 19 inverse scales ``-(nmax + 0.1·is)/max`` and keeps the least-squares scale
    with the largest ``(Σ w x l)² / Σ w l²``.
    """
    x = np.asarray(x, dtype=F32)
    w = x * x if qw is None else np.asarray(qw, dtype=F32)
    amax, mx = first_max_abs(x)
    live = ~(amax < GROUP_MAX_EPS)
    mx = np.where(live, mx, F32(1))
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        return lv, seqsum(wx * lf), seqsum(w * lf * lf)

    best_is = F32(-nmax) / mx
    _, sumlx, suml2 = trial(best_is)
    scale = safe_div(sumlx, suml2, suml2 != 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        _, sumlx, suml2 = trial(iscale)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            new_scale = safe_div(sumlx, suml2, better)
        best_is = np.where(better, iscale, best_is)  # levels are a function of the scale: redo once
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    levels = np.where(live, trial(best_is)[0] + nmax, 0)
    return np.where(live, scale, F32(0)), levels


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's reference search: RTN at ``-nmax/max`` then ≤ 5 coordinate-descent passes (w = x²)."""
    x = np.asarray(x, dtype=F32)
    amax, mx = first_max_abs(x)
    live = ~(amax < GROUP_MAX_EPS)
    mx = np.where(live, mx, F32(1))
    iscale = F32(-nmax) / mx
    lv = nearest_int(iscale * x)
    np.minimum(np.maximum(lv, -nmax, out=lv), nmax - 1, out=lv)
    w = x * x
    wx = w * x
    lf = lv.astype(F32)
    sumlx, suml2 = seqsum(wx * lf), seqsum(w * lf * lf)
    lv, sumlx, suml2 = _descent(x, w, wx, lv, sumlx, suml2, -nmax, nmax - 1, qp=False)
    scale = safe_div(sumlx, suml2, suml2 > 0)
    return np.where(live, scale, F32(0)), np.where(live, lv + nmax, 0)


def make_qkx_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    *,
    strict_flat: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric levels ``[0, nmax]`` with a min: ``make_qkx2_quants`` / ``make_qkx3_quants``.

    Returns ``(scale, the_min, L)`` where ``x ≈ scale·L − the_min``.  Each candidate inverse
    scale ``(rmin + rdelta·is + nmax)/(max − min)`` gets a weighted least-squares (scale, min);
    the one with the lowest weighted error (|·| if ``use_mad``, else squared) wins.  As in C,
    the running ``min`` is updated when a candidate wins and later candidates use it.
    ``strict_flat`` selects qkx2's ``max == min`` test (qkx3 uses ``max <= min``).
    """
    x = np.asarray(x, dtype=F32)
    w = np.asarray(weights, dtype=F32)
    mn = first_min(x)
    mx = first_max(x)
    sum_w = seqsum(w, from_zero=False)
    sum_x = seqsum(w * x, from_zero=False)
    mn = np.where(mn > 0, F32(0), mn)
    flat = (mx == mn) if strict_flat else ~(mx > mn)
    span0 = np.where(flat, F32(1), mx - mn)

    def err(scale: np.ndarray, minv: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = scale * lf + minv - x
        diff = np.abs(diff) if use_mad else diff * diff
        return seqsum(w * diff)

    iscale = F32(nmax) / span0
    scale = F32(1) / iscale
    levels = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
    best = err(scale, mn, levels.astype(F32))
    cur_min = mn
    best_is, best_from = iscale, mn  # the winning rounding, redone once at the end
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for step in range(nstep + 1):
            span = np.where(flat, F32(1), mx - cur_min)
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
            laux = np.clip(nearest_int(iscale * (x - cur_min)), 0, nmax)
            lf = laux.astype(F32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = det > 0
            safe_det = np.where(ok, det, F32(1))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 != 0, sum_l2, F32(1)), this_scale)
            cur = err(this_scale, this_min, lf)
            better = ok & (cur < best) & ~flat
            best_is = np.where(better, iscale, best_is)
            best_from = np.where(better, cur_min, best_from)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            cur_min = np.where(better, this_min, cur_min)
        levels = np.clip(nearest_int(best_is * (x - best_from)), 0, nmax)
    levels = np.where(flat, 0, levels)
    scale = np.where(flat, F32(0), scale)
    return scale, -cur_min, levels


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative levels ``[0, nmax]`` for non-negative ``x`` (scales of scales, IQ2 magnitudes).

    RTN over 9 inverse scales by weighted MSE, then ≤ 5 coordinate-descent passes.
    """
    x = np.asarray(x, dtype=F32)
    w = np.asarray(qw, dtype=F32)
    mx = np.maximum.reduce(x, axis=0, initial=F32(0))
    live = ~(mx < GROUP_MAX_EPS)
    mx = np.where(live, mx, F32(1))

    def mse(iscale: np.ndarray, clamp: bool) -> np.ndarray:
        lv = nearest_int(iscale * x)
        # the first pass stores into C's uint8_t L before using it; the tries use an int
        lv = np.minimum(lv, nmax) if clamp else lv & 0xFF
        d = x - (F32(1) / iscale) * lv.astype(F32)
        return seqsum(w * d * d)

    iscale = F32(nmax) / mx
    best = mse(iscale, clamp=False)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for step in range(-4, 5):
            if step == 0:
                continue
            cand = (F32(0.1) * F32(step) + F32(nmax)) / mx
            cur = mse(cand, clamp=True)
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, cand, iscale)
        lv = np.minimum(nearest_int(iscale * x), nmax)
        wx = w * x
        lf = lv.astype(F32)
        sumlx, suml2 = seqsum(wx * lf), seqsum(w * lf * lf)
        lv = lv & 0xFF  # C keeps L as uint8_t: a negative level (negative x, IQ2) reads back mod 256
    lv, sumlx, suml2 = _descent(x, w, wx, lv, sumlx, suml2, None, nmax, qp=True)
    scale = safe_div(sumlx, suml2, suml2 > 0)
    return np.where(live, scale, F32(0)), np.where(live, lv, 0)


def _descent(x, w, wx, lv, sumlx, suml2, lo, hi, *, qp: bool):
    """≤ 5 coordinate-descent passes over the positions (``make_q3_quants`` / ``make_qp_quants``).

    Each position's level is re-solved given the others and kept if ``(Σwxl)²/Σwl²`` grows.
    A group that changes nothing in a pass is converged (the next pass would see the same
    state), so later passes only visit the groups that changed in the previous one.
    """
    n = x.shape[0]
    act = np.arange(x.shape[1])
    xs, ws, wxs, lvs = x, w, wx, lv
    slx_all, sl2_all = np.array(sumlx, dtype=F32), np.array(suml2, dtype=F32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for it in range(5):
            if it:
                xs, ws, wxs, lvs = x[:, act], w[:, act], wx[:, act], lv[:, act]
                slx_all, sl2_all = sumlx[act], suml2[act]
            changed = np.zeros(len(act), dtype=bool)
            buf = _Buffers(len(act))
            for i in range(n):
                wi, xi, wxi, lvi = ws[i], xs[i], wxs[i], lvs[i]
                new_l, slx, sl2, c = buf.candidates(xi, wi, wxi, lvi, slx_all, sl2_all, lo, hi, qp)
                if not c.size:
                    continue
                nl, nlf = new_l[c], new_l[c].astype(F32)
                slx_c = slx[c] + wxi[c] * nlf
                sl2_c = sl2[c] + wi[c] * nlf * nlf
                s_old, s2_old = slx_all[c], sl2_all[c]
                better = slx_c * slx_c * s2_old > s_old * s_old * sl2_c
                if not qp:
                    better &= sl2_c > 0
                acc = c[better]
                lvi[acc] = nl[better] & 0xFF if qp else nl[better]
                slx_all[acc] = slx_c[better]
                sl2_all[acc] = sl2_c[better]
                changed[acc] = True
            if it:
                lv[:, act], sumlx[act], suml2[act] = lvs, slx_all, sl2_all
            else:
                lv, sumlx, suml2 = lvs, slx_all, sl2_all
            act = act[changed]
            if not act.size:
                break
    return lv, sumlx, suml2


class _Buffers:
    """Scratch vectors of one descent pass: the per-position step runs in place, allocation-free.

    The arithmetic is C's, operation for operation (same float32 results as the plain
    expressions ``slx = Σ − wx·l``, ``sl2 = Σ − w·l·l``, ``nearest_int(x·sl2/slx)``).
    """

    def __init__(self, g: int) -> None:
        self.li, self.slx, self.sl2, self.t = (np.empty(g, dtype=F32) for _ in range(4))
        self.ok, self.cand = np.empty(g, dtype=bool), np.empty(g, dtype=bool)
        self.q = np.empty(g, dtype=np.int32)

    def candidates(self, xi, wi, wxi, lvi, slx_all, sl2_all, lo, hi, qp):
        """Re-solved level of every group at this position, the sums without it, and the movers."""
        li, slx, sl2, t, ok, q = self.li, self.slx, self.sl2, self.t, self.ok, self.q
        np.copyto(li, lvi, casting="unsafe")
        np.multiply(wxi, li, out=t)
        np.subtract(slx_all, t, out=slx)
        np.multiply(wi, li, out=t)
        t *= li
        np.subtract(sl2_all, t, out=sl2)
        np.greater(slx, F32(0), out=ok)
        if qp:
            ok &= sl2 > 0
        np.multiply(xi, sl2, out=li)
        np.divide(li, slx, out=t)  # where slx ≤ 0 the quotient is junk, but those are masked by ok
        t += _MAGIC  # nearest_int, in place
        iv = t.view(np.int32)
        np.bitwise_and(iv, 0x007FFFFF, out=q)
        q -= 0x00400000
        if lo is not None:
            np.clip(q, lo, hi, out=q)
        else:
            np.minimum(q, hi, out=q)
        np.not_equal(q, lvi, out=self.cand)
        self.cand &= ok
        return q, slx, sl2, np.flatnonzero(self.cand)


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the sorted int8 table ``values`` (ties go up, as in C).

    C bisects for ``mu``, the first entry above ``x``; with integer entries that count is a
    function of ``floor(x)``, so it comes from a 258-entry table instead of a binary search.
    """
    vals = np.asarray(values, dtype=F32)
    x = np.asarray(x, dtype=F32)
    n = len(vals)
    table = _rank_table(tuple(int(v) for v in values))
    with np.errstate(invalid="ignore"):
        f = np.floor(x) + F32(129)
        f = np.clip(f.astype(np.int64), 0, 257)
    mu = np.clip(table[f], 1, n - 1)
    idx = mu - ((x - vals[mu - 1]) < (vals[mu] - x))
    idx[x <= vals[0]] = 0
    idx[x >= vals[-1]] = n - 1
    return idx


@functools.cache
def _rank_table(values: tuple[int, ...]) -> np.ndarray:
    """``table[v + 129]`` = number of entries ≤ v, for integers v in [-129, 128]."""
    return np.searchsorted(np.asarray(values), np.arange(-129, 129), side="right")
