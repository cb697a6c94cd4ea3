"""Shared pieces of the vector-codebook methods (VPTQ, AQLM): code storage, the proxy loss and
its gradient, codebook tuning with Adam, and the decode-on-the-fly layer.

Both methods store, per linear, integer codes indexing small per-layer codebooks (fp16, counted
in bpw) and decode a row band as a gather; they differ in how codes are chosen (nearest
vector after error feedback vs additive beam search).  What they share lives here once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from q2lab.errors import ModelError
from q2lab.quant.base import QuantizedTensor
from q2lab.quant.linear import RowDecodeLinear
from q2lab.utils.packing import pack_bits, packed_nbytes, unpack_bits
from q2lab.utils.threads import one_thread

FP16_BITS = 16


def check_finite(name: str, weight: torch.Tensor) -> None:
    """One clear line for a weight with NaN/inf instead of a k-means or Cholesky failure."""
    if not bool(torch.isfinite(weight).all()):
        raise ModelError(f"{name}: the weight contains non-finite values (NaN or inf); cannot quantize it")


# --------------------------------------------------------------------------- code storage
def store_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in ``[0, 2^bits)`` as stored: uint8 (8 bits), int16 two's complement (16 bits),
    else a dense bit stream (:func:`q2lab.utils.packing.pack_bits`)."""
    flat = codes.reshape(-1)
    if bits == 16:
        c = flat.to(torch.int32)
        return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)
    return pack_bits(flat, bits)


def load_codes(
    stored: torch.Tensor, bits: int, count: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Codes ``start:stop`` of ``count`` stored ones, int64 (unpacks only their bytes when the
    slice is byte-aligned, as a row band of whole rows usually is)."""
    stop = count if stop is None else stop
    if bits == 16:
        return stored.reshape(-1)[start:stop].to(torch.int64) & 0xFFFF
    if bits == 8:
        return stored.reshape(-1)[start:stop].to(torch.int64)
    if (start * bits) % 8 == 0 and (stop == count or (stop * bits) % 8 == 0):
        b0 = start * bits // 8
        part = stored[b0 : b0 + packed_nbytes(stop - start, bits)]
        return unpack_bits(part, bits, stop - start).to(torch.int64)
    return unpack_bits(stored, bits, count)[start:stop].to(torch.int64)


def codebook_bits(entries: int, dim: int) -> int:
    """Storage bits of one fp16 codebook."""
    return entries * dim * FP16_BITS


# --------------------------------------------------------------------------- the proxy loss
def proxy_and_grad(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> tuple[float, torch.Tensor]:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) and its gradient with respect to Ŵ, −2 (W − Ŵ) H."""
    g = (w - w_hat) @ h
    with one_thread():
        loss = float(((w - w_hat) * g).double().sum())
    return loss, -2.0 * g


def scatter_grad(grad_vectors: torch.Tensor, codes: torch.Tensor, entries: int) -> torch.Tensor:
    """Sum the gradients of decoded vectors (N, d) into their codebook entries (entries, d)."""
    with one_thread():  # a scatter sum: thread-independent bits, since tuning feeds stored values
        return torch.zeros(entries, grad_vectors.shape[1], dtype=grad_vectors.dtype).index_add_(
            0, codes, grad_vectors
        )


def adam_tune(
    params: list[torch.Tensor],
    step_fn: Callable[[], tuple[float, list[torch.Tensor]]],
    steps: int,
    lr: float,
) -> float:
    """Adam on ``params`` with hand-written gradients: ``step_fn()`` returns (loss, grads) at the
    current values.  Keeps the best values seen (the start included) and returns their loss."""
    best_loss, _ = step_fn()
    best = [p.detach().clone() for p in params]
    if steps <= 0:
        return best_loss
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss, grads = step_fn()
        if loss < best_loss:
            best_loss, best = loss, [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    loss, _ = step_fn()
    if loss < best_loss:
        best_loss, best = loss, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return best_loss


# --------------------------------------------------------------------------- inference layer
class VQLinear(RowDecodeLinear):
    """Codebook layer: with ``cache_weight=False`` each call gathers ``chunk_rows`` rows of
    codebook vectors and multiplies, never holding the float matrix.  ``decoder(qt, r0, r1)``
    is the method's row decode (the same function its ``dequantize`` uses)."""

    def __init__(
        self,
        qt: QuantizedTensor,
        bias: torch.Tensor | None,
        decoder: Callable[[QuantizedTensor, int, int], torch.Tensor],
        cache_weight: bool = True,
    ) -> None:
        super().__init__(qt, bias, cache_weight=cache_weight)
        self._decoder = decoder

    def decode_rows(self, r0: int, r1: int) -> torch.Tensor:
        return self._decoder(self.qtensor, r0, r1)
