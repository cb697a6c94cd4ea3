"""E8P12: QuIP#'s 2-bit codebook of 2^16 points of the E8 lattice shifted by ¼, in dimension 8.

Construction (QuIP#, Tseng et al. 2024, §4.2).  E8 = D8 ∪ D̂8 with D̂8 = {x ∈ (ℤ+½)^8 : Σx even}.
A point of D̂8 is an *absolute pattern* a ∈ {½, 3/2, 5/2, ...}^8 times a sign vector; flipping
one sign changes Σx by an odd number, so the parity rule fixes the 8th sign once 7 are chosen:
(#negative entries) ≡ Σa (mod 2).  E8P12 takes 256 absolute patterns — the 227 of |D̂8| with
‖a‖² ≤ 10 plus 29 with ‖a‖² = 12 (five 3/2 and three ½) — × 2^7 sign patterns × a shift of
±¼ (D̂8 − ¼ = D8 + ¼, so every point lies in E8 + ¼): 2^8 · 2^7 · 2 = 2^16 points, 16 bits per
8 weights = 2 bits per weight.  Stored compactly: a 256 × 8 table of ½-multiples; the full
codebook is derived.

Which 29 norm-12 patterns: the paper fixes a list (not a rule) of 29 of the 56 patterns with
five 3/2 and three ½; we use exactly that published list (``_NORM12``, data, not code), so our
codebook is the paper's point set.  Its MSE on Gaussians is measured in the tests and in
``benchmarks/e8p_mse.py``.

Code layout (one uint16 per 8 weights):  bits 15..8 = absolute-pattern index, bits 7..1 = the
signs of coordinates 1..7 (1 = negative), bit 0 = shift (1: +¼, 0: −¼).

Nearest-point search is exact and needs no pass over the 2^16 points.  For a shift t, with
y = x − t, u = |y| sorted decreasingly and p = parity of #negatives of y:

* the absolute patterns with ‖a‖² ≤ 10 come in full permutation orbits (7 of them); within an
  orbit the best pattern pairs larger entries with larger u (rearrangement inequality), so its
  score is ⟨a_sorted, u_sorted⟩.  If the orbit's parity Σa differs from p, one sign must be
  flipped against y: the best flip is the smallest |y_i|, which then gets the smallest entry ½
  (every orbit has one), costing u_min in the score.
* the 29 norm-12 patterns are an incomplete orbit and are scored one by one (29 dot products;
  a parity flip picks the coordinate minimising a_i·u_i).

The distance is ‖y‖² + ‖a‖² − 2·score; the best over orbits, the 29 extra patterns and both
shifts is the nearest codebook point (checked against brute force in the tests).
"""

from __future__ import annotations

import functools
import itertools

import torch

from q2lab.errors import ShapeError

DIM = 8
NUM_SOURCES = 256
NUM_POINTS = 1 << 16


# --------------------------------------------------------------------------- construction
# The 29 extra absolute patterns of squared norm 12, as odd integers 2a (3 = 3/2, 1 = ½), in the
# order the QuIP# paper lists them.
_NORM12 = (
    (3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
    (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
    (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
    (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
    (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
    (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
    (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
    (3, 3, 1, 1, 3, 3, 3, 1),
)  # fmt: skip


@functools.cache
def _source_halves() -> tuple[tuple[int, ...], ...]:
    """The 256 absolute patterns as odd integers 2a (so a = value/2), in a fixed order:
    the 227 of norm² ≤ 10 sorted by (norm, pattern), then the paper's 29 of norm² 12."""
    odd = (1, 3, 5, 7)
    small = sorted(
        (p for p in itertools.product(odd, repeat=DIM) if sum(v * v for v in p) <= 40),
        key=lambda p: (sum(v * v for v in p), p),
    )
    out = small + list(_NORM12)
    assert len(small) == 227 and len(set(out)) == NUM_SOURCES
    return tuple(out)


def source_points() -> torch.Tensor:
    """(256, 8) absolute patterns (entries ½, 3/2, 5/2): the compact stored form of E8P12."""
    return torch.tensor(_source_halves(), dtype=torch.float32) / 2


def _parity_of_sources() -> torch.Tensor:
    """Σa mod 2 per pattern (Σa is an integer: 8 half-odd entries)."""
    return (torch.tensor(_source_halves()).sum(1) // 2) % 2


def decode_rule(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint16 codes (any shape) to points (..., 8) straight from the bit layout."""
    c = codes.to(torch.int64)
    src = source_points().to(codes.device)
    a = src[c >> 8]
    neg7 = (c.unsqueeze(-1) >> torch.arange(1, DIM, device=c.device)) & 1  # coords 1..7
    neg0 = (neg7.sum(-1) + _parity_of_sources().to(c.device)[c >> 8]) % 2
    neg = torch.cat([neg0.unsqueeze(-1), neg7], dim=-1)
    shift = torch.where((c & 1) == 1, 0.25, -0.25).unsqueeze(-1)
    return a * (1 - 2 * neg).float() + shift


@functools.cache
def _lut(device: str, dtype: torch.dtype) -> torch.Tensor:
    return decode_rule(torch.arange(NUM_POINTS, device=torch.device(device))).to(dtype)


def codebook(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All 2^16 points, row i = the point of code i (built once per device/dtype, 2 MiB in fp32)."""
    return _lut(str(torch.device(device)), dtype)


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (any shape, values in [0, 2^16)) → points (..., 8) by table lookup."""
    return codebook(codes.device, dtype)[codes.to(torch.int64)]


# --------------------------------------------------------------------------- nearest point
@functools.cache
def _search_tables(device: str) -> dict[str, torch.Tensor]:
    dev = torch.device(device)
    halves = torch.tensor(_source_halves())
    a = halves.float() / 2
    norms = (a * a).sum(1)
    full = norms <= 10.0 + 1e-6
    # one representative per permutation orbit (entries sorted decreasingly) among the full ones
    orbits = sorted({tuple(sorted(p, reverse=True)) for p, f in zip(_source_halves(), full.tolist()) if f})
    orbit_sorted = torch.tensor(orbits, dtype=torch.float32) / 2  # (7, 8) decreasing
    # index of an absolute pattern from its base-4 key ((2a−1)/2 ∈ {0,1,2,3} per coordinate)
    key = ((halves - 1) // 2 * 4 ** torch.arange(DIM)).sum(1)
    index_of_key = torch.full((4**DIM,), -1, dtype=torch.int64)
    index_of_key[key] = torch.arange(NUM_SOURCES)
    return {
        "orbit_sorted": orbit_sorted.to(dev),
        "orbit_norm": (orbit_sorted**2).sum(1).to(dev),
        "orbit_parity": ((orbit_sorted.sum(1)).round().long() % 2).to(dev),
        "extra": a[~full].to(dev),  # (29, 8)
        "extra_sorted": torch.tensor([1.5] * 5 + [0.5] * 3, device=dev),
        "extra_norm": norms[~full].to(dev),
        "extra_parity": _parity_of_sources()[~full].to(dev),
        "extra_index": torch.nonzero(~full).squeeze(1).to(dev),
        "index_of_key": index_of_key.to(dev),
        "pow4": (4 ** torch.arange(DIM)).to(dev),
    }


def _search_shift(y: torch.Tensor, t: dict[str, torch.Tensor]):
    """Best absolute pattern for y (N, 8) with D̂8's parity rule: (dist − ‖y‖², src index, flip coord)."""
    u = y.abs()
    negpar = ((y < 0).sum(1) % 2).unsqueeze(1)  # (N, 1)
    u_sorted, order = torch.sort(u, dim=1, descending=True)
    u_min = u_sorted[:, -1:]
    # full orbits: rearrangement score, minus u_min when a parity flip is needed
    orbit_flip = negpar != t["orbit_parity"]  # (N, 7)
    score = u_sorted @ t["orbit_sorted"].T - orbit_flip * u_min
    dist, io = (t["orbit_norm"] - 2 * score).min(1)
    flip = orbit_flip.gather(1, io.unsqueeze(1)).squeeze(1)
    flip_coord = order[:, -1].clone()
    # the chosen orbit's pattern in y's coordinates: sorted entries placed by u's order
    a_sorted = t["orbit_sorted"][io]
    halves = torch.empty_like(a_sorted).scatter_(1, order, a_sorted).mul_(2).round_().long()
    src = t["index_of_key"][(((halves - 1) // 2) * t["pow4"]).sum(1)]
    # the 29 extra patterns (an incomplete orbit of norm 12): their whole orbit's score bounds
    # them from below, so only vectors whose bound beats the best full orbit are scored one by one
    bound_flip = negpar.squeeze(1) != t["extra_parity"][0]
    bound = 12.0 - 2 * (u_sorted @ t["extra_sorted"] - bound_flip * u_min.squeeze(1))
    rows = torch.nonzero(bound < dist).squeeze(1)
    if rows.numel():
        us = u[rows]
        prod = us.unsqueeze(1) * t["extra"]  # (R, 29, 8)
        min_val, min_pos = prod.min(-1)
        e_flip = bound_flip[rows].unsqueeze(1)
        d_extra, ie = (t["extra_norm"] - 2 * (us @ t["extra"].T - 2 * e_flip * min_val)).min(1)
        better = d_extra < dist[rows]
        rows, ie = rows[better], ie[better]
        dist[rows] = d_extra[better]
        src[rows] = t["extra_index"][ie]
        flip[rows] = bound_flip[rows]
        flip_coord[rows] = min_pos[better].gather(1, ie.unsqueeze(1)).squeeze(1)
    flip_coord = torch.where(flip, flip_coord, torch.full_like(flip_coord, -1))
    return dist, src, flip_coord


def quantize(x: torch.Tensor, chunk: int = 1 << 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P12 point to each row of ``x`` (..., 8): ``(points, codes)``, codes int32 in [0, 2^16)."""
    if x.shape[-1] != DIM:
        raise ShapeError(f"E8P12 quantizes 8-dimensional vectors, got last dim {x.shape[-1]}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, DIM).float()
    codes = torch.empty(flat.shape[0], dtype=torch.int64, device=flat.device)
    t = _search_tables(str(flat.device))
    for s in range(0, flat.shape[0], chunk):
        codes[s : s + chunk] = _quantize_chunk(flat[s : s + chunk], t)
    codes = codes.view(lead)
    return decode(codes).to(x.dtype), codes.to(torch.int32)


def _quantize_chunk(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Codes of the nearest points: both shifts searched in one batch (+¼ first, bit 0 = 1)."""
    n = x.shape[0]
    y = torch.cat([x - 0.25, x + 0.25])
    dist, src, flip = _search_shift(y, t)
    dist = dist + (y * y).sum(1)
    neg = y < 0
    rows = torch.nonzero(flip >= 0).squeeze(1)
    neg[rows, flip[rows]] = ~neg[rows, flip[rows]]
    sign_bits = (neg[:, 1:].long() << torch.arange(DIM - 1, device=x.device)).sum(1)
    code = (src << 8) | (sign_bits << 1)
    code[:n] |= 1
    return torch.where(dist[n:] < dist[:n], code[n:], code[:n])


# --------------------------------------------------------------------------- E8 1-bit residual book
@functools.cache
def _e8_1bit_points() -> tuple[tuple[float, ...], ...]:
    """256 points of E8 for 1-bit residuals: the origin, the 240 roots (‖x‖² = 2) and 15 of the
    16 vectors ±2e_i (all but −2e_8), as in QuIP#'s 3-bit codebook."""
    pts = [(0.0,) * DIM]
    for i, j in itertools.combinations(range(DIM), 2):  # D8 roots ±e_i ± e_j: 112
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * DIM
            v[i], v[j] = si, sj
            pts.append(tuple(v))
    for signs in itertools.product((0.5, -0.5), repeat=DIM):  # (±½)^8 with an even number of −: 128
        if sum(s < 0 for s in signs) % 2 == 0:
            pts.append(signs)
    for s, i in itertools.product((2.0, -2.0), range(DIM)):
        if not (s < 0 and i == DIM - 1):
            v = [0.0] * DIM
            v[i] = s
            pts.append(tuple(v))
    assert len(pts) == 256
    return tuple(pts)


def e8_1bit_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(_e8_1bit_points(), dtype=torch.float32, device=device)


def quantize_e8_1bit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of the 256 points (exhaustive: one (N, 8) × (8, 256) product)."""
    cb = e8_1bit_codebook(x.device)
    flat = x.reshape(-1, DIM).float()
    idx = (flat @ cb.T * 2 - (cb * cb).sum(1)).argmax(1)
    return cb[idx].view(x.shape).to(x.dtype), idx.view(x.shape[:-1]).to(torch.int32)


# --------------------------------------------------------------------------- reference sets and MSE
def e8_shifted_nearest(count: int = NUM_POINTS, radius2: float = 14.0) -> torch.Tensor:
    """The ``count`` points of E8 + ¼ nearest the origin (ties broken arbitrarily), float64.

    An independent reference for E8P12: the paper argues its 2^16 points are close to this ball.
    Enumerated coordinate by coordinate with a norm bound (each coset of D8 on its own), so it
    never touches more than the ~10^5 points inside the ball of squared radius ``radius2``.
    """
    pts = []
    for offset in (0.25, 0.75):  # D8 + ¼ and D̂8 + ¼ = D8 + ½ + ¼
        vals = torch.arange(-5, 5, dtype=torch.float64) + offset
        part = torch.zeros(1, 0, dtype=torch.float64)
        for _ in range(DIM):
            grid = torch.cat(
                [part.repeat_interleave(len(vals), 0), vals.repeat(len(part)).unsqueeze(1)], dim=1
            )
            part = grid[(grid * grid).sum(1) <= radius2]
        lattice = part - 0.25  # the E8 coset point x, then the parity rule Σx even
        even = torch.remainder(lattice.sum(1), 2.0).abs() < 1e-9
        pts.append(part[even])
    allp = torch.cat(pts)
    if allp.shape[0] < count:
        raise ValueError(f"only {allp.shape[0]} points within squared radius {radius2}; raise it")
    order = torch.argsort((allp * allp).sum(1), stable=True)
    return allp[order[:count]]


def nearest_in(x: torch.Tensor, points: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Brute-force nearest of ``points`` (P, 8) to each row of ``x`` (N, 8): the oracle for tests."""
    p = points.to(x.dtype)
    pn = (p * p).sum(1)
    idx = torch.cat([(2 * x[s : s + chunk] @ p.T - pn).argmax(1) for s in range(0, x.shape[0], chunk)])
    return p[idx]
