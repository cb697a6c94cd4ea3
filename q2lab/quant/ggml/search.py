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

import numpy as np

from q2lab.quant.ggml.fp import (
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

    lv, sumlx, suml2 = trial(F32(-nmax) / mx)
    levels = lv + nmax
    scale = safe_div(sumlx, suml2, suml2 != 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            new_scale = safe_div(sumlx, suml2, better)
        levels = np.where(better, lv + nmax, levels)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    levels = np.where(live, levels, 0)
    return np.where(live, scale, F32(0)), levels


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's reference search: RTN at ``-nmax/max`` then ≤ 5 coordinate-descent passes (w = x²)."""
    x = np.asarray(x, dtype=F32)
    n = x.shape[0]
    amax, mx = first_max_abs(x)
    live = ~(amax < GROUP_MAX_EPS)
    mx = np.where(live, mx, F32(1))
    iscale = F32(-nmax) / mx
    lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = lv.astype(F32)
    sumlx, suml2 = seqsum(wx * lf), seqsum(w * lf * lf)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(n):
                wi, xi, wxi = w[i], x[i], wx[i]
                li = lv[i].astype(F32)
                slx = sumlx - wxi * li
                ok = slx > 0
                sl2 = suml2 - wi * li * li
                new_l = np.clip(nearest_int(xi * sl2 / np.where(ok, slx, F32(1))), -nmax, nmax - 1)
                ok &= new_l != lv[i]
                nl = new_l.astype(F32)
                slx = slx + wxi * nl
                sl2 = sl2 + wi * nl * nl
                ok &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                lv[i] = np.where(ok, new_l, lv[i])
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
                changed |= ok
            if not changed.any():
                break
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
            levels = np.where(better, laux, levels)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            cur_min = np.where(better, this_min, cur_min)
    levels = np.where(flat, 0, levels)
    scale = np.where(flat, F32(0), scale)
    return scale, -cur_min, levels


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative levels ``[0, nmax]`` for non-negative ``x`` (scales of scales, IQ2 magnitudes).

    RTN over 9 inverse scales by weighted MSE, then ≤ 5 coordinate-descent passes.
    """
    x = np.asarray(x, dtype=F32)
    w = np.asarray(qw, dtype=F32)
    n = x.shape[0]
    mx = np.maximum.reduce(x, axis=0, initial=F32(0))
    live = ~(mx < GROUP_MAX_EPS)
    mx = np.where(live, mx, F32(1))

    def mse(iscale: np.ndarray, clamp: bool) -> np.ndarray:
        lv = nearest_int(iscale * x)
        if clamp:
            lv = np.minimum(lv, nmax)
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
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(n):
                wi, xi, wxi = w[i], x[i], wx[i]
                li = lv[i].astype(F32)
                slx = sumlx - wxi * li
                sl2 = suml2 - wi * li * li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nearest_int(xi * sl2 / np.where(ok, slx, F32(1))), nmax)
                ok &= new_l != lv[i]
                nl = new_l.astype(F32)
                slx = slx + wxi * nl
                sl2 = sl2 + wi * nl * nl
                ok &= slx * slx * suml2 > sumlx * sumlx * sl2
                lv[i] = np.where(ok, new_l, lv[i])
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
                changed |= ok
            if not changed.any():
                break
    scale = safe_div(sumlx, suml2, suml2 > 0)
    return np.where(live, scale, F32(0)), np.where(live, lv, 0)


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the sorted int8 table ``values`` (ties go up, as in C)."""
    vals = np.asarray(values, dtype=F32)
    x = np.asarray(x, dtype=F32)
    mu = np.clip(np.searchsorted(vals, x, side="right"), 1, len(vals) - 1)
    lo, hi = vals[mu - 1], vals[mu]
    idx = np.where(x - lo < hi - x, mu - 1, mu)
    idx = np.where(x <= vals[0], 0, idx)
    return np.where(x >= vals[-1], len(vals) - 1, idx)
