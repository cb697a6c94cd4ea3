"""Viterbi search on the bitshift trellis, vectorized over many sequences (QTIP §3.1, App. A).

Finds, for each sequence x (T weights = n steps of V), the state path s_0 … s_{n−1} that
minimises Σ_i ‖x_i − code(s_i)‖².  The trellis structure makes one step two tensor ops over
all sequences at once: the predecessors of state s' = r·2^{kV} + c are p = j·2^{L−kV} + r for
the 2^{kV} values of j, so the best predecessor cost for every r is a min over one axis of the
cost viewed as (S, 2^{kV}, 2^{L−kV}), broadcast back over the 2^{kV} successors of r.

Memory.  The back-pointers (the argmin j per (step, sequence, r), int64 so that ``torch.min``
writes them in place) dominate: 8·n·2^{L−kV} bytes per sequence, 32 MiB at L = 16, k = 2,
V = 1, T = 256.  Sequences are
processed in chunks sized to ``max_bytes``; the cost arrays (S × 2^L float32) are small.

Tail-biting (stored streams wrap around, see :mod:`~q2lab.quant.qtip.trellis`).  The exact
solution is a min over all 2^{L−kV} overlaps; QTIP's two-pass approximation is used instead:
run an unconstrained Viterbi on the sequence rotated by half its length, read the overlap
that the best path has at the real wrap point (the top L − kV bits of s_0), then rerun with
s_0 and s_{n−1} constrained to that overlap.  ``tail_biting="exact"`` enumerates every
overlap (for tests and tiny L).
"""

from __future__ import annotations

from typing import Literal

import torch

from q2lab.quant.qtip.trellis import Trellis

DEFAULT_MAX_BYTES = 256 << 20


def viterbi(
    x: torch.Tensor,
    table: torch.Tensor,
    trellis: Trellis,
    *,
    overlap: torch.Tensor | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best state paths for sequences ``x`` (S × T) under ``table`` (2^L × V).

    With ``overlap`` (S,) the path is constrained to s_0 >> kV == overlap and
    s_{n−1} mod 2^{L−kV} == overlap (a tail-biting path through that overlap).
    Returns (states (S × n) int64, squared error per sequence (S,)).
    """
    S, T = x.shape
    n = trellis.steps(T)
    per_seq = 8 * n * (1 << trellis.overlap_bits) + 16 * trellis.n_states
    chunk = max(1, max_bytes // per_seq)
    states, costs = [], []
    for s0 in range(0, S, chunk):
        ov = None if overlap is None else overlap[s0 : s0 + chunk]
        st, c = _viterbi_chunk(x[s0 : s0 + chunk], table, trellis, ov)
        states.append(st)
        costs.append(c)
    if not states:
        return x.new_zeros((0, n), dtype=torch.int64), x.new_zeros(0)
    return torch.cat(states), torch.cat(costs)


def _viterbi_chunk(
    x: torch.Tensor, table: torch.Tensor, tr: Trellis, overlap: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    S, T = x.shape
    n, kv, ob = T // tr.V, tr.kv, tr.overlap_bits
    dev = x.device
    tab = table.to(device=dev, dtype=torch.float32).T.contiguous()  # (V, 2^L)
    xs = x.to(torch.float32).view(S, n, tr.V)
    all_states = torch.arange(tr.n_states, device=dev)
    back = torch.empty(n, S, 1 << ob, dtype=torch.int64, device=dev)
    # Distances are computed for a slab of steps at once (few, large ops: on CPU the per-op
    # overhead, not the arithmetic, dominates small trellises); a slab holds ≤ 2^22 floats.
    slab = max(1, (1 << 22) // (S * tr.n_states))
    dists = _distances(xs[:, :slab], tab)
    cost = dists[:, 0].clone()
    if overlap is not None:
        ov = overlap.to(device=dev, dtype=torch.int64)[:, None]
        cost.masked_fill_((all_states[None] >> kv) != ov, float("inf"))
    best = torch.empty(S, 1 << ob, device=dev)
    # Views made once: the loop body is two kernel calls writing in place.
    by_pred, by_succ = cost.view(S, 1 << kv, 1 << ob), cost.view(S, 1 << ob, 1 << kv)
    best_b = best[:, :, None]
    backs = back.unbind(0)
    steps = dists.view(S, -1, 1 << ob, 1 << kv).unbind(1)
    for i in range(1, n):
        if i % slab == 0:
            steps = _distances(xs[:, i : i + slab], tab).view(S, -1, 1 << ob, 1 << kv).unbind(1)
        torch.min(by_pred, dim=1, out=(best, backs[i]))
        torch.add(steps[i % slab], best_b, out=by_succ)
    if overlap is not None:
        cost.masked_fill_((all_states[None] & ((1 << ob) - 1)) != ov, float("inf"))
    final, last = cost.min(dim=1)
    # Backtrack: s_{i−1} = (j_i << (L − kV)) | (s_i >> kV), j_i the stored argmin; in-place ops
    # into preallocated buffers (the loop is per-op-overhead bound on CPU).
    path = torch.empty(n, S, 1, dtype=torch.int64, device=dev)
    path[n - 1, :, 0] = last
    paths = path.unbind(0)
    r = torch.empty(S, 1, dtype=torch.int64, device=dev)
    for i in range(n - 1, 0, -1):
        torch.bitwise_right_shift(paths[i], kv, out=r)
        torch.gather(backs[i], 1, r, out=paths[i - 1])
        paths[i - 1].bitwise_left_shift_(ob).bitwise_or_(r)
    return path[:, :, 0].T.contiguous(), final


def _distances(xs: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
    """‖x_i − code(s)‖² for steps xs (S, steps, V) and every state: (S, steps, 2^L)."""
    d = (xs[:, :, 0:1] - tab[0]).square_()
    for v in range(1, xs.shape[2]):
        d += (xs[:, :, v : v + 1] - tab[v]).square_()
    return d


def quantize_sequences(
    x: torch.Tensor,
    table: torch.Tensor,
    trellis: Trellis,
    *,
    tail_biting: Literal["approx", "exact", "none"] = "approx",
    max_bytes: int = DEFAULT_MAX_BYTES,
    warmup: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail-biting trellis quantization of sequences ``x`` (S × T).

    Returns (states (S × n), reconstruction (S × T)).  ``"none"`` gives an unconstrained path
    (not storable in n·kV bits; for comparisons).  ``warmup``: steps either side of the wrap
    point that the approximate mode's first pass sees (None: the whole rotated sequence).
    """
    S, T = x.shape
    n = trellis.steps(T)
    if tail_biting == "none":
        states, _ = viterbi(x, table, trellis, max_bytes=max_bytes)
    elif tail_biting == "exact":
        states, best = None, None
        for ov in range(1 << trellis.overlap_bits):
            o = torch.full((S,), ov, dtype=torch.int64, device=x.device)
            st, c = viterbi(x, table, trellis, overlap=o, max_bytes=max_bytes)
            if states is None:
                states, best = st, c
            else:
                better = c < best
                states[better], best = st[better], torch.minimum(best, c)
    else:
        # Pass 1 only needs the best path's state at the wrap point: run it on a window of
        # `warmup` steps either side of the wrap (the cyclic sequence rotated so that the wrap
        # is in the window's middle), not on the whole rotated sequence.
        half = n // 2 if warmup is None else min(n // 2, warmup)
        rolled = torch.roll(x, half * trellis.V, dims=1)[:, : 2 * half * trellis.V]
        st, _ = viterbi(rolled, table, trellis, max_bytes=max_bytes)
        overlap = st[:, half] >> trellis.kv  # rolled step `half` is original step 0
        states, _ = viterbi(x, table, trellis, overlap=overlap, max_bytes=max_bytes)
    assert states is not None
    return states, decode(states, table, trellis).view(S, T)


def decode(states: torch.Tensor, table: torch.Tensor, trellis: Trellis) -> torch.Tensor:
    """States (..., n) → values (..., n·V) through the code table."""
    vals = table.to(states.device)[states]  # (..., n, V)
    return vals.reshape(*states.shape[:-1], states.shape[-1] * trellis.V)
