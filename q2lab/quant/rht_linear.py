"""Quantized layers stored in the randomized-Hadamard basis (QuIP#, QTIP): W = Uᵀ·W̃·V.

A method whose codes decode to rows of W̃ (already scaled) subclasses :class:`RHTLinear` and
implements :meth:`RHTLinear.hadamard_rows`.  With ``cache_weight`` (the default, fastest on CPU)
the layer behaves like any :class:`~q2lab.quant.linear.QuantLinear`; without, each call computes
``y = Uᵀ(W̃ (V x))``: two fast Hadamard transforms of the activations and the decode of
``chunk_rows`` output rows at a time, so the float matrix is never held — the memory a GPU
kernel would save, and the path such a kernel replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from q2lab.finetune.relax import stored_rht
from q2lab.quant.linear import QuantLinear
from q2lab.transforms.hadamard import hadamard_transform


class RHTLinear(QuantLinear):
    """Decode-on-the-fly layer for weights stored as codes of W̃ = U W Vᵀ (see module doc)."""

    chunk_rows = 256  # output rows decoded per step when not caching (peak extra memory)

    def hadamard_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of W̃ (scale applied), float32; ``r0`` is a multiple of :meth:`row_step`."""
        raise NotImplementedError

    def row_step(self) -> int:
        """Chunk boundaries must be multiples of this (e.g. a trellis tile's rows)."""
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_weight:
            return super().forward(x)
        rht = stored_rht(self.qtensor)
        xt = hadamard_transform(x.float() * rht.s_in)
        unit = self.row_step()
        step = max(unit, self.chunk_rows // unit * unit)
        m = self.out_features
        z = torch.cat(
            [F.linear(xt, self.hadamard_rows(r, min(r + step, m))) for r in range(0, m, step)], dim=-1
        )
        y = (hadamard_transform(z, inverse=True) * rht.s_out).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)
