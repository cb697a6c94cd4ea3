"""Shared pieces of the vector-codebook methods (VPTQ, AQLM): code storage, the proxy loss and
its gradient, codebook tuning with Adam, the decode-on-the-fly layer, and the PV-tuning view
(continuous books and scales, discrete codes, the V step's re-encoding).

Both methods store, per linear, integer codes indexing small per-layer codebooks (fp16, counted
in bpw) and decode a row band as a gather; they differ in how codes are chosen (nearest
vector after error feedback vs additive beam search).  What they share lives here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from q2lab.codebooks.kmeans import nearest
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


# --------------------------------------------------------------------------- PV-tuning view
@dataclass
class PVRegion:
    """Part of a codebook layer whose vectors are sums of stage codewords:
    vector_i = Σ_s books[s][codes[i, s]].  ``targets(W)`` maps a float weight to this region's
    target vectors (N, d) in the books' space and a weight per vector (N,) that turns squared
    distances there into squared distances in W (AQLM: the row scale²)."""

    books: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]  # stage books, from the params
    codes: torch.Tensor  # (N, stages) int64
    targets: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PVView:
    """A codebook layer opened for PV-tuning (Malinovskii et al., 2024): ``params`` are the
    continuous tensors (float32 books, scales) the P step trains with the codes fixed;
    ``regions`` hold the codes the V step re-chooses.  ``decode(params, codes)`` is the weight,
    differentiable in ``params``; ``write(params, codes)`` is the stored layer with the tuned
    values (same formats and bit counts)."""

    qt: QuantizedTensor
    params: dict[str, torch.Tensor]
    regions: list[PVRegion]
    decode: Callable[[dict[str, torch.Tensor], list[torch.Tensor]], torch.Tensor]
    store: Callable[[dict[str, torch.Tensor], list[torch.Tensor]], dict[str, torch.Tensor]]

    def codes(self) -> list[torch.Tensor]:
        return [r.codes for r in self.regions]

    def weight(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.decode(self.params if params is None else params, self.codes())

    def write(self) -> QuantizedTensor:
        """The stored layer with the current books, scales and codes (stored dtypes, so the
        reloaded model is the tuned one up to fp16 rounding of the books)."""
        with torch.no_grad():
            tensors = {**self.qt.tensors, **self.store(self.params, self.codes())}
        return dataclasses.replace(self.qt, tensors=tensors)


@torch.no_grad()
def v_step(view: PVView, target: torch.Tensor, fraction: float) -> int:
    """The V step: re-choose codes towards ``target`` (the weight after a gradient step).  Each
    vector's stages are re-chosen in turn (nearest codeword to what the other stages leave);
    of the vectors that would move closer, the ``fraction`` with the largest gain (squared
    distance in W) take their new codes.  Returns how many vectors changed."""
    changed = 0
    for region in view.regions:
        books = [b.detach() for b in region.books(view.params)]
        x, weight = region.targets(target, view.params)
        codes = region.codes
        cur = sum(b[codes[:, s]] for s, b in enumerate(books))
        new_codes, new = codes.clone(), cur.clone()
        for s, b in enumerate(books):
            others = new - b[new_codes[:, s]]
            c = nearest(x - others, b)
            new = others + b[c]
            new_codes[:, s] = c
        gain = weight * ((x - cur).square().sum(1) - (x - new).square().sum(1))
        k = min(int(fraction * gain.numel()), int((gain > 0).sum()))
        if k <= 0:
            continue
        idx = torch.topk(gain, k).indices
        codes[idx] = new_codes[idx]
        changed += k
    return changed
