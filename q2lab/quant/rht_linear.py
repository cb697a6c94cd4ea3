"""Quantized layers stored in the randomized-Hadamard basis (QuIP#, QTIP): W = Uᵀ·W̃·V.

A method whose codes decode to rows of W̃ (already scaled) subclasses :class:`RHTLinear` and
implements :meth:`RHTLinear.decode_rows`.  With ``cache_weight`` (the default, fastest on CPU)
the layer behaves like any :class:`~q2lab.quant.linear.QuantLinear`; without, each call computes
``y = Uᵀ(W̃ (V x))``: two fast Hadamard transforms of the activations and the decode of
``chunk_rows`` output rows at a time, so the float matrix is never held — the memory a GPU
kernel would save, and the path such a kernel replaces.

:func:`stored_rht` is the one decode of a stored tensor's RHT (packed signs ``s_out``, ``s_in``,
times the fp16 gains ``g_out``, ``g_in`` that fine-tuning may have written): methods decode
through it and :mod:`q2lab.finetune.relax` tunes what it reads.
"""

from __future__ import annotations

import torch

from q2lab.quant.base import QuantizedTensor
from q2lab.quant.linear import QuantLinear, RowDecodeLinear
from q2lab.transforms.hadamard import RHT, hadamard_transform, unpack_signs


def stored_rht(qt: QuantizedTensor) -> RHT:
    """The RHT a stored tensor decodes with: its sign vectors, times its gains when tuned."""
    m, n = qt.shape
    t = qt.tensors
    dev = t["scale"].device
    s_out = unpack_signs(t["s_out"], m).to(dev)
    s_in = unpack_signs(t["s_in"], n).to(dev)
    if "g_out" in t:
        s_out = s_out * t["g_out"].float()
        s_in = s_in * t["g_in"].float()
    return RHT(s_out, s_in)


class RHTLinear(RowDecodeLinear):
    """Decode-on-the-fly layer for weights stored as codes of W̃ = U W Vᵀ (see module doc):
    :meth:`decode_rows` gives rows of W̃ (scale applied), between two Hadamard transforms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_weight:
            return QuantLinear.forward(self, x)
        rht = stored_rht(self.qtensor)
        z = self.chunked_product(hadamard_transform(x.float() * rht.s_in))
        y = (hadamard_transform(z, inverse=True) * rht.s_out).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)
