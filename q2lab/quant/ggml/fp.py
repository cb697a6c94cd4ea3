"""float32 primitives that reproduce ggml's C arithmetic bit for bit, vectorised over blocks.

ggml's reference quantizers (``ggml-quants.c``, built into ``libggml-base`` without fast-math or
FMA contraction) evaluate every expression in IEEE single precision, left to right, and
accumulate sums sequentially.  NumPy's float32 element-wise operations are the same IEEE
operations, so the only things that need care are:

* sums: ``np.sum`` is pairwise, C is sequential — :func:`seqsum` adds column by column;
* ``nearest_int``: ggml's magic-number rounding (round half to even, garbage beyond 2^22) —
  :func:`nearest_int` uses the same bit trick;
* "first element that beats the running best" scans, whose result differs from ``max`` only
  in the sign of a zero — :func:`first_max_abs` and friends return the C value;
* scalars: every constant is a ``np.float32`` so nothing is promoted to float64.

Groups are laid out position-major: a batch of G groups of n weights is an (n, G) array, so
the C loop over the n positions of a group becomes n operations on contiguous G-vectors (and
a per-group scalar is a plain (G,) vector that broadcasts).  Only the loops whose order matters
remain; every step is vectorised across groups.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer (half to even)


def f32(v: float) -> np.float32:
    """A C ``float`` constant (``0.1f`` is ``f32(0.1)``)."""
    return F32(v)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even via the 1.5·2^23 trick, as int32."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seqsum(a: np.ndarray, *, from_zero: bool = True) -> np.ndarray:
    """Sequential float32 sum over the first axis (C's ``s = 0; for (...) s += a[i];``).

    ``from_zero=False`` starts from the first element instead of ``0 + a[0]`` (C code that
    initialises the accumulator with the first term); the two differ only for ``-0.0``.
    """
    a = np.asarray(a, dtype=F32)
    s = a[0] + F32(0) if from_zero else a[0].copy()
    for row in a[1:]:
        s += row
    return s


def fp16_round(v: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: round to nearest even half precision."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """The stored ``ggml_fp16_t`` of ``v`` (uint16)."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def take_first(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx[None], axis=0)[0]


def first_max_abs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(amax, max)``: the first element with the largest |x| and its signed value.

    C: ``if (ax > amax) { amax = ax; max = x[i]; }`` starting from ``amax = 0``.  The signed
    value is the column max or min, whichever is larger in magnitude; only where both reach it
    (``+a`` and ``-a`` in one group) does the first occurrence decide, found by ``argmax`` on
    those few columns (a full ``argmax`` over position-major data is the slow path).
    """
    hi, lo = x.max(axis=0), x.min(axis=0)
    neg = -lo
    amax = np.maximum(hi, neg)
    mx = np.where(hi >= neg, hi, lo)
    tie = np.flatnonzero((hi == neg) & (hi > 0))
    if tie.size:
        sub = x[:, tie]
        mx[tie] = take_first(sub, np.argmax(np.abs(sub), axis=0))
    zero = ~(amax > 0)
    return np.where(zero, F32(0), amax), np.where(zero, F32(0), mx)


def first_min(x: np.ndarray) -> np.ndarray:
    """C's ``min = x[0]; if (x[i] < min) min = x[i];`` (the first minimal element)."""
    return take_first(x, np.argmin(x, axis=0))


def first_max(x: np.ndarray) -> np.ndarray:
    """C's ``max = x[0]; if (x[i] > max) max = x[i];`` (the first maximal element)."""
    return take_first(x, np.argmax(x, axis=0))


def running_max(x: np.ndarray, init: float = 0.0) -> np.ndarray:
    """C's ``m = init; if (x[i] > m) m = x[i];`` over the first axis."""
    m = x.max(axis=0)
    return np.where(m > F32(init), m, F32(init)).astype(F32)


def safe_div(num: np.ndarray, den: np.ndarray, ok: np.ndarray, fallback: float = 0.0) -> np.ndarray:
    """``ok ? num/den : fallback`` without evaluating the division where ``ok`` is false."""
    out = np.full(np.broadcast(num, den).shape, F32(fallback), dtype=F32)
    np.divide(num, den, out=out, where=ok)
    return out


def safe_recip(d: np.ndarray) -> np.ndarray:
    """``d ? 1/d : 0`` in float32."""
    d = np.asarray(d, dtype=F32)
    return safe_div(np.ones_like(d), d, d != 0)
