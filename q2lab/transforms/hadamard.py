"""Fast Walsh–Hadamard transforms and randomized Hadamard transforms (RHT) of weight matrices.

Why: QuIP#, QTIP and SpinQuant make a weight matrix *incoherent* (no large entries, roughly
i.i.d. Gaussian entries) by rotating both of its sides with a random orthogonal matrix that is
cheap to apply.  A Hadamard matrix times a random ±1 diagonal is such a rotation, applied in
O(n log n) instead of the O(n²) of a dense one, and stored as n sign bits.

Sizes.  An order-n Hadamard matrix is built as the Kronecker product ``H_p ⊗ H_{2^k}`` of a
small "base" matrix of order p (found by rule, see below) and a Sylvester matrix of order 2^k
(applied by the butterfly).  p is the smallest order that covers n's odd part:

* Sylvester: p = 1 (n a power of two);
* Paley I: p = q + 1 for a prime power q ≡ 3 (mod 4) (12 = 11+1, 20, 28 = 27+1, 44, 60, ...);
* Paley II: p = 2(q + 1) for a prime power q ≡ 1 (mod 4) (12, 28 = 2·14, 36 = 2·18, 52 = 2·26, ...);
* Kronecker products of those, when the odd part factors (e.g. 12 ⊗ 20 for 15·16).

So SmolLM2's 576 = 36·16 and 1536 = 12·128, Gemma-3's 640 = 20·32 and Mistral's 14336 = 28·512
all work.  A size with no such decomposition (odd n > 1, n ≡ 2 mod 4, or e.g. n = 92 whose only
Hadamard matrices come from other constructions) raises :class:`UnsupportedSizeError`, naming
the nearest supported sizes; callers may pad to one of them.

Conventions.  ``hadamard_transform(x)`` returns ``x @ Hᵀ/√n`` along the last dim (i.e. ``H x``
for each row vector); ``inverse=True`` returns ``x @ H/√n``.  Both are orthogonal maps.  Base
matrices of Paley I type are not symmetric, so the two directions differ in general.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from q2lab.errors import ShapeError
from q2lab.utils.packing import pack_bits, unpack_bits


class UnsupportedSizeError(ShapeError):
    """No Hadamard matrix of this order can be built by the rules this module knows."""


# --------------------------------------------------------------------------- finite fields
def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p**k`` and p prime, or None."""
    if q < 2:
        return None
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 else None
    return (q, 1)


def _poly_mod(a: np.ndarray, f: np.ndarray, p: int) -> np.ndarray:
    """Reduce polynomials ``a`` (rows of coefficients, lowest degree first) modulo monic ``f``."""
    a = a.copy() % p
    k = len(f) - 1
    for d in range(a.shape[1] - 1, k - 1, -1):
        c = a[:, d : d + 1]
        a[:, d - k : d + 1] = (a[:, d - k : d + 1] - c * f) % p
    return a[:, :k]


def _is_irreducible(f: np.ndarray, p: int) -> bool:
    """Trial division of monic ``f`` by every monic polynomial of degree 1..deg(f)//2."""
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for low in np.ndindex(*([p] * d)):
            g = np.array([*low, 1])
            if not _poly_mod(f[None, :], g, p).any():
                return False
    return True


@functools.cache
def _quadratic_character(q: int) -> np.ndarray:
    """χ over GF(q) as a table of (q, q) values χ(a − b) ∈ {0, 1, −1}, elements numbered 0..q−1.

    Element ``e`` of GF(p^k) is the polynomial whose coefficients are e's base-p digits.
    """
    pk = _prime_power(q)
    assert pk is not None
    p, k = pk
    digits = (np.arange(q)[:, None] // p ** np.arange(k)[None, :]) % p  # (q, k), lowest first
    if k == 1:
        squares = (np.arange(q) ** 2) % p
    else:
        f = next(
            np.array([*low, 1]) for low in np.ndindex(*([p] * k)) if _is_irreducible(np.array([*low, 1]), p)
        )
        prod = np.zeros((q, 2 * k - 1), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                prod[:, i + j] += digits[:, i] * digits[:, j]
        sq_digits = _poly_mod(prod, f, p)
        squares = (sq_digits * p ** np.arange(k)[None, :]).sum(1)
    chi = -np.ones(q, dtype=np.int64)
    chi[np.unique(squares)] = 1
    chi[0] = 0
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # a − b, digit-wise
    return chi[(diff * p ** np.arange(k)).sum(-1)]


def _paley1(q: int) -> np.ndarray:
    """Order q+1 (q ≡ 3 mod 4): I + [[0, 1ᵀ], [−1, Q]] with Q the Jacobsthal matrix."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _quadratic_character(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1) (q ≡ 1 mod 4): C = [[0, 1ᵀ], [1, Q]] with 0 → [[1,−1],[−1,−1]], ±1 → ±[[1,1],[1,−1]]."""
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _quadratic_character(q)
    zero_blk = np.array([[1, -1], [-1, -1]])
    one_blk = np.array([[1, 1], [1, -1]])
    return np.kron(c, one_blk) + np.kron((c == 0).astype(np.int64), zero_blk)


# --------------------------------------------------------------------------- base orders
@functools.cache
def _base_recipe(order: int) -> tuple | None:
    """How to build a Hadamard matrix of ``order`` (a multiple of 4 or 1, 2), or None."""
    if order & (order - 1) == 0:
        return ("sylvester", order)
    if order % 4:
        return None
    if _prime_power(order - 1) and (order - 1) % 4 == 3:
        return ("paley1", order - 1)
    if _prime_power(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return ("paley2", order // 2 - 1)
    # Kronecker product of two smaller constructible orders (each a multiple of 4, or 2).
    for a in range(2, math.isqrt(order) + 1, 2):
        if order % a == 0 and _base_recipe(a) and _base_recipe(order // a):
            return ("kron", a, order // a)
    return None


@functools.cache
def _base_matrix(order: int) -> np.ndarray:
    """The ±1 integer Hadamard matrix of ``order`` built by :func:`_base_recipe`."""
    recipe = _base_recipe(order)
    if recipe is None:
        raise UnsupportedSizeError(f"no Hadamard matrix of order {order} can be built by rule")
    kind = recipe[0]
    if kind == "sylvester":
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < order:
            h = np.kron(np.array([[1, 1], [1, -1]]), h)
        return h
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return np.kron(_base_matrix(recipe[1]), _base_matrix(recipe[2]))


@functools.cache
def _factor(n: int) -> tuple[int, int] | None:
    two = n & -n  # largest power of two dividing n
    odd = n // two
    if odd == 1:
        return 1, n
    b = 2
    while (1 << b) <= two:
        p = odd << b
        if _base_recipe(p) is not None:
            return p, n // p
        b += 1
    return None


def factor(n: int) -> tuple[int, int]:
    """``(p, s)`` with ``n = p·s``, s a power of two and p the smallest constructible base order.

    Raises :class:`UnsupportedSizeError` when n has no decomposition.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UnsupportedSizeError(f"Hadamard transforms need a positive integer size, got {n!r}")
    found = _factor(n)
    if found is not None:
        return found
    two = n & -n
    odd = n // two
    raise UnsupportedSizeError(
        f"no Hadamard transform of size {n} (= {odd}·{two}): it needs a Hadamard matrix of order "
        f"{odd}·2^b with 2^b ≤ {two}, and none is built by the Sylvester/Paley rules; "
        f"nearest supported sizes: {', '.join(map(str, nearest_supported(n)))}"
    )


def is_supported(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and _factor(n) is not None


def nearest_supported(n: int, count: int = 2) -> list[int]:
    """The ``count`` smallest supported sizes ≥ n (useful for padding)."""
    out, m = [], max(n, 1)
    while len(out) < count:
        if is_supported(m):
            out.append(m)
        m += 1
    return out


def base_matrix(order: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ±1 base Hadamard matrix of ``order`` as a tensor (unnormalized)."""
    return torch.as_tensor(_base_matrix(order), dtype=dtype, device=device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The dense orthogonal matrix H_n/√n this module applies (for tests and small sizes)."""
    return hadamard_transform(torch.eye(n, dtype=dtype, device=device)).T.contiguous()


# --------------------------------------------------------------------------- transforms
_RADIX = 16  # butterfly stages are fused into dense 16×16 Sylvester multiplies (BLAS-friendly)


@functools.cache
def _digit_matrices(n: int, inverse: bool, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Right-multiplication matrices for each index digit of n = p·2^k, least significant first.

    Sylvester digits are radix-16 (the last one smaller); the base matrix H_p is the most
    significant digit.  Forward multiplies a digit by H_pᵀ (row vectors: x ↦ x Hᵀ).
    """
    p, s = factor(n)
    dev = torch.device(device)
    mats = []
    while s > 1:
        r = min(_RADIX, s)
        mats.append(torch.as_tensor(_base_matrix(r), dtype=dtype, device=dev))
        s //= r
    if p > 1:
        hp = torch.as_tensor(_base_matrix(p), dtype=dtype, device=dev)
        mats.append(hp if inverse else hp.T.contiguous())
    return mats


def hadamard_transform(x: torch.Tensor, inverse: bool = False, scale: bool = True) -> torch.Tensor:
    """Orthogonal Hadamard transform along the last dim: ``x @ Hᵀ/√n`` (``x @ H/√n`` if inverse).

    Batched over leading dims; works on any device and float dtype.  O(n log n + n·p) for
    n = p·2^k with base order p (H = H_p ⊗ H_{2^k}).

    The index is split into digits (radix-16 Sylvester digits, then p).  Each pass multiplies
    the lowest digit by its small dense matrix (one large GEMM) and rotates that digit to the
    front, so after one pass per digit every digit is transformed and the order is restored:
    the butterfly's O(n log n) work done as a few BLAS calls instead of log2(n) elementwise
    passes.
    """
    n = x.shape[-1]
    factor(n)  # a clear error for unsupported sizes before any reshaping
    if not torch.is_floating_point(x):
        x = x.float()
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for m in _digit_matrices(n, inverse, y.dtype, str(y.device)):
        r = m.shape[0]
        y = (y.reshape(-1, r) @ m).view(rows, n // r, r).transpose(1, 2).reshape(rows, n)
    y = y.reshape(*lead, n)
    return y * (1.0 / math.sqrt(n)) if scale else y


# --------------------------------------------------------------------------- randomized transform
def random_signs(n: int, seed: int, device=None) -> torch.Tensor:
    """n random ±1 values (float32) from a seeded generator: reproducible on every machine."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(device=device, dtype=torch.float32)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 vector → 1 bit per entry (1 = negative), as uint8."""
    return pack_bits((signs < 0).to(torch.int32), 1)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    return 1.0 - 2.0 * unpack_bits(packed, 1, n).float()


@dataclass
class RHT:
    """Randomized Hadamard transform on both sides of an (m × n) weight matrix.

    ``U = H_m·diag(s_out)/√m`` and ``V = H_n·diag(s_in)/√n``; the transformed weight is
    ``W̃ = U W Vᵀ`` and the layer ``y = W x`` becomes ``y = Uᵀ W̃ (V x)``, so the inputs seen
    by W̃ are ``V x`` and their second moment is ``H̃ = V H Vᵀ``.  Quantizing W̃ against H̃
    minimizes exactly the same output error as quantizing W against H.
    """

    s_out: torch.Tensor  # (m,) ±1
    s_in: torch.Tensor  # (n,) ±1

    @classmethod
    def make(cls, m: int, n: int, seed: int, device=None) -> RHT:
        factor(m), factor(n)  # fail early with a clear message
        return cls(random_signs(m, 2 * seed + 1, device), random_signs(n, 2 * seed, device))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.s_out.numel(), self.s_in.numel())

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x ↦ V x for row vectors x (..., n)."""
        return hadamard_transform(x * self.s_in.to(x))

    def outputs(self, z: torch.Tensor) -> torch.Tensor:
        """z ↦ Uᵀ z for row vectors z (..., m): the last step of the layer."""
        return hadamard_transform(z, inverse=True) * self.s_out.to(z)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W ↦ U W Vᵀ."""
        wv = self.inputs(w)  # rows: W Vᵀ
        return hadamard_transform(wv.T * self.s_out.to(wv)).T  # columns: U (W Vᵀ)

    def unweight(self, wt: torch.Tensor) -> torch.Tensor:
        """W̃ ↦ Uᵀ W̃ V (the inverse of :meth:`weight`)."""
        left = (hadamard_transform(wt.T, inverse=True) * self.s_out.to(wt)).T  # Uᵀ W̃
        return hadamard_transform(left, inverse=True) * self.s_in.to(wt)  # (Uᵀ W̃) V

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """H ↦ V H Vᵀ (H symmetric)."""
        hv = self.inputs(h)  # H Vᵀ (rows of symmetric H)
        return self.inputs(hv.T.contiguous())  # V (H Vᵀ)
