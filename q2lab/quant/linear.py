"""``QuantLinear``: an ``nn.Linear`` replacement that holds a :class:`QuantizedTensor`.

The stored tensors are module buffers (they move with ``.to(device)`` and are what a
checkpoint saves).  The forward pass decodes the weight with the method's own decoder — the
torch reference path every faster kernel is checked against.  By default the decoded weight
is cached in the compute dtype, which makes CPU evaluation as fast as the float model; the
cache replaces the float weight the layer had, so memory stays at one float copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from q2lab.quant.base import QuantizedTensor


class QuantLinear(nn.Module):
    def __init__(
        self, qt: QuantizedTensor, bias: torch.Tensor | None = None, cache_weight: bool = True
    ) -> None:
        super().__init__()
        self.method = qt.method
        self.out_features, self.in_features = qt.shape
        self.meta = dict(qt.meta)
        self.bit_counts = dict(qt.bit_counts)
        self._names = tuple(qt.tensors)
        for name, t in qt.tensors.items():
            self.register_buffer(f"q_{name}", t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.cache_weight = cache_weight
        self._cached: torch.Tensor | None = None

    @property
    def qtensor(self) -> QuantizedTensor:
        tensors = {n: getattr(self, f"q_{n}") for n in self._names}
        return QuantizedTensor(
            self.method, (self.out_features, self.in_features), tensors, self.meta, self.bit_counts
        )

    def weight_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._cached is not None and self._cached.dtype == dtype and self._cached.device == self.q_device:
            return self._cached
        w = self.qtensor.dequantize(dtype)
        if self.cache_weight:
            self._cached = w
        return w

    @property
    def q_device(self) -> torch.device:
        return getattr(self, f"q_{self._names[0]}").device

    def _apply(self, fn, recurse=True):
        self._cached = None  # device/dtype moves invalidate the decoded cache
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            x, self.weight_dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        bpw = sum(self.bit_counts.values()) / (self.out_features * self.in_features)
        return f"{self.in_features} → {self.out_features}, method={self.method}, bpw={bpw:.4f}"


class RowDecodeLinear(QuantLinear):
    """A layer whose codes decode a band of output rows at a time (vector codebooks, Hadamard-
    basis codes).  With ``cache_weight`` it is a plain :class:`QuantLinear`; without, each call
    multiplies by ``chunk_rows`` decoded rows at a time, so the float matrix is never held."""

    chunk_rows = 256  # output rows decoded per step when not caching (peak extra memory)

    def decode_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the matrix the layer multiplies by (float32); ``r0`` is a multiple of
        :meth:`row_step`."""
        raise NotImplementedError

    def row_step(self) -> int:
        """Chunk boundaries must be multiples of this (e.g. a trellis tile's rows)."""
        return 1

    def chunked_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Mᵀ`` for the decoded matrix M, band by band (float32)."""
        unit = self.row_step()
        step = max(unit, self.chunk_rows // unit * unit)
        m = self.out_features
        return torch.cat(
            [F.linear(x, self.decode_rows(r, min(r + step, m))) for r in range(0, m, step)], dim=-1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_weight:
            return super().forward(x)
        y = self.chunked_product(x.float()).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)
