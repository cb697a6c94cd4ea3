"""The bitshift trellis of QTIP (Tseng et al., 2024, §3.1): states, tail-biting, bit packing.

Why a bitshift trellis: trellis-coded quantization reaches near rate–distortion distortion on
Gaussian sources, and in the "bitshift" form its decoding is trivially parallel.  A sequence
of T weights is coded in n = T/V steps of V weights each.  Step i is in an L-bit *state* s_i
that decodes (through a code, :mod:`q2lab.quant.qtip.codes`) to V values; the next state drops
the top kV bits and shifts in kV new ones::

    s_{i+1} = ((s_i << kV) | c_{i+1}) mod 2^L,      c_i = s_i mod 2^{kV}.

So the states are the L-bit windows of one bit stream that slides kV bits per step, and the
whole sequence is stored as its chunks c_0 … c_{n−1}: k bits per weight.

Tail-biting.  A plain stream needs L − kV extra bits for the first state.  We store exactly
n·kV bits by reading the stream cyclically: s_0's top L − kV bits are s_{n−1}'s low L − kV
bits (the stream wraps around).  A path is valid iff every consecutive pair (including
s_{n−1} → s_0) overlaps like that; :mod:`q2lab.quant.qtip.viterbi` finds such paths.

Decoding is by shifting: s_i = Σ_m c_{i−m} · 2^{m·kV} (mod 2^L), indices mod n — a handful of
rolls and shifts over the chunk tensor, no sequential loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from q2lab.errors import ConfigError, ShapeError
from q2lab.utils.packing import pack_bits, unpack_bits


@dataclass(frozen=True)
class Trellis:
    """A bitshift trellis: ``L``-bit states, ``k`` bits per weight, ``V`` weights per step."""

    L: int
    k: int
    V: int = 1

    def __post_init__(self) -> None:
        if self.V not in (1, 2):
            raise ConfigError(f"trellis V (weights per step) must be 1 or 2, got {self.V!r}")
        if not 1 <= self.k <= 8:
            raise ConfigError(f"trellis k (bits per weight) must be in [1, 8], got {self.k!r}")
        if not self.kv < self.L <= 24:
            raise ConfigError(
                f"trellis L must be in ({self.kv}, 24] for k={self.k}, V={self.V}, got {self.L!r}"
            )

    @property
    def kv(self) -> int:
        """Bits shifted in per step."""
        return self.k * self.V

    @property
    def n_states(self) -> int:
        return 1 << self.L

    @property
    def overlap_bits(self) -> int:
        """Bits a state shares with the next one (L − kV)."""
        return self.L - self.kv

    def steps(self, length: int) -> int:
        """Steps n for a sequence of ``length`` weights (must be a multiple of V, n·kV ≥ L)."""
        if length % self.V or length // self.V * self.kv < self.L:
            raise ShapeError(
                f"a trellis sequence needs a multiple of V={self.V} weights and at least "
                f"{self.L} bits; got {length} weights"
            )
        return length // self.V

    # ------------------------------------------------------------------ states <-> chunks
    def chunks(self, states: torch.Tensor) -> torch.Tensor:
        """The kV-bit chunk each state shifted in (its low bits)."""
        return states & ((1 << self.kv) - 1)

    def states(self, chunks: torch.Tensor) -> torch.Tensor:
        """Tail-biting decode by shifting: chunks (..., n) → states (..., n), int64."""
        c = chunks.to(torch.int64)
        out = torch.zeros_like(c)
        for m in range(-(-self.L // self.kv)):
            out |= torch.roll(c, m, dims=-1) << (m * self.kv)
        return out & (self.n_states - 1)

    def is_tail_biting(self, states: torch.Tensor) -> torch.Tensor:
        """Per sequence: does every step (s_{n−1} → s_0 included) overlap as the trellis requires?"""
        low = states & ((1 << self.overlap_bits) - 1)
        nxt = torch.roll(states, -1, dims=-1) >> self.kv
        return (low == nxt).all(dim=-1)

    # ------------------------------------------------------------------ packing
    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """Tail-biting states (..., n) → packed bit stream, exactly n·kV bits per sequence."""
        return pack_bits(self.chunks(states), self.kv)

    def unpack(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Packed stream → states of ``shape`` (..., n)."""
        numel = 1
        for d in shape:
            numel *= d
        return self.states(unpack_bits(packed, self.kv, numel).view(shape))
