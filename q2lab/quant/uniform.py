"""Uniform (integer-grid) quantization shared by RTN, GPTQ and every scalar-grid method.

One home for: group layout (including a shorter last group when the group size does not
divide the row, e.g. SmolLM2's 576 = 4·128 + 64), scale/zero search, rounding, and the
storage format with its exact bit count.

Grids
-----
* asymmetric: ``w ≈ (q − z)·s`` with ``q ∈ [0, 2^b)``, integer zero point ``z`` stored in b bits
  and an fp16 scale per group (GPTQ's convention; the range always includes 0).
* symmetric: ``w ≈ (q − 2^(b−1))·d`` with one signed fp16 ``d`` per group chosen so that the
  largest-magnitude weight lands exactly on the most negative level (llama.cpp's Q4_0 rule),
  which uses all 2^b levels instead of wasting one.
* stretched elastic (SEQ, ParetoQ's low-bit grid, used by UPQ): ``w ≈ (q − 2^(b−1) + ½)·s``,
  levels ±½s, ±1½s, … symmetric about zero with no zero level; one positive fp16 ``s`` per group.
  Stored as a symmetric grid whose fixed zero point (``meta["zero"]``) is half-integer.

Scales are rounded to fp16 *before* rounding the weights, so what is decoded is exactly what
was optimised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from q2lab.errors import ConfigError
from q2lab.quant.base import QuantizedTensor, index_bits
from q2lab.utils.packing import pack_bits, unpack_bits

ClipMode = Literal["minmax", "mse"]
_FP16_MAX = 65504.0
# Shrink factors tried by the MSE clipping search (1.0 = plain min/max).
_CLIP_GRID = torch.linspace(1.0, 0.5, 21)


@dataclass(frozen=True)
class GroupLayout:
    """Column groups of a row of ``n`` weights with nominal size ``g`` (last one may be short)."""

    n: int
    g: int

    @classmethod
    def make(cls, n: int, group_size: int | None) -> GroupLayout:
        if group_size is not None and group_size < 1:
            raise ConfigError(f"group size must be ≥ 1 (or null for one group per row), got {group_size}")
        g = n if group_size is None else min(group_size, n)
        return cls(n, g)

    @property
    def count(self) -> int:
        return -(-self.n // self.g)

    def bounds(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.g, self.n)) for s in range(0, self.n, self.g)]

    def sizes(self) -> torch.Tensor:
        return torch.tensor([e - s for s, e in self.bounds()])

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """(rows, groups) → (rows, n): repeat each group's value over its columns."""
        return per_group.repeat_interleave(self.sizes().to(per_group.device), dim=1)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)


def grid_params(
    w: torch.Tensor, bits: int, symmetric: bool, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (rows × group), fp16-exact scales.

    Returns ``(scale, zero)`` of shape (rows,), with ``w ≈ (q − zero)·scale``.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    if symmetric:
        idx = w.abs().argmax(dim=1, keepdim=True)
        m = torch.gather(w, 1, idx).squeeze(1) * shrink
        scale = fp16_round(m / -(1 << (bits - 1)))
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    lo = torch.clamp(w.min(dim=1).values, max=0.0) * shrink
    hi = torch.clamp(w.max(dim=1).values, min=0.0) * shrink
    flat = (hi - lo) == 0
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
    scale = fp16_round((hi - lo) / maxq)
    scale = torch.where(scale == 0, torch.full_like(scale, 6e-8), scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in ``[0, 2^b)`` for ``w`` (..., k) with per-row ``scale``/``zero`` (..., 1) or (...)."""
    if scale.ndim == w.ndim - 1:
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / safe) + zero, 0, (1 << bits) - 1)


def from_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.ndim == q.ndim - 1:
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (q - zero) * scale


def fit_group(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: ClipMode = "minmax",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, zero) per row of one group ``w`` (rows × k).

    ``clip="mse"`` shrinks the range over a fixed grid and keeps, per row, the factor with the
    lowest squared error, weighted per column by ``importance`` (e.g. the Hessian diagonal).
    """
    if clip == "minmax":
        return grid_params(w, bits, symmetric)
    if clip != "mse":
        raise ConfigError(f"clip must be 'minmax' or 'mse', got {clip!r}")
    w = w.float()
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale = torch.empty(w.shape[0], device=w.device)
    best_zero = torch.empty(w.shape[0], device=w.device)
    col_w = None if importance is None else importance.to(w.device, torch.float32).clamp_min(0)
    for p in _CLIP_GRID.tolist():
        scale, zero = grid_params(w, bits, symmetric, p)
        err = (from_grid(round_to_grid(w, scale, zero, bits), scale, zero) - w).pow(2)
        err = (err * col_w).sum(1) if col_w is not None else err.sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# --------------------------------------------------------------------------- storage
def encode(
    method: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    layout: GroupLayout,
    symmetric: bool,
    perm: torch.Tensor | None = None,
    extra_meta: dict | None = None,
) -> QuantizedTensor:
    """Pack integer codes (rows × cols, in stored column order) and group params.

    ``perm`` (act-order): stored column ``j`` is original column ``perm[j]``; groups are
    contiguous in stored order.
    """
    rows, cols = codes.shape
    tensors = {"codes": pack_bits(codes, bits), "scales": scales.to(torch.float16).contiguous()}
    bit_counts = {"codes": rows * cols * bits, "scales": scales.numel() * 16}
    if not symmetric:
        tensors["zeros"] = pack_bits(zeros, bits)
        bit_counts["zeros"] = zeros.numel() * bits
    if perm is not None:
        tensors["perm"], bit_counts["perm"] = _encode_perm(perm, cols)
    meta = {"bits": bits, "group_size": layout.g, "symmetric": symmetric, "format": "uniform"}
    meta.update(extra_meta or {})
    return QuantizedTensor(method, (rows, cols), tensors, meta, bit_counts)


def encode_rows(
    method: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    row_sizes: list[int],
    **kw,
) -> list[QuantizedTensor]:
    """:func:`encode` for a stack of matrices quantized together, split back by rows."""
    parts = zip(codes.split(row_sizes), scales.split(row_sizes), zeros.split(row_sizes))
    return [encode(method, c, s, z, **kw) for c, s, z in parts]


def decode(qt: QuantizedTensor) -> torch.Tensor:
    cols = qt.shape[1]
    layout = GroupLayout(cols, int(qt.meta["group_size"]))
    q = stored_codes(qt).float()
    scales = qt.tensors["scales"].float()
    zeros = stored_zeros(qt)
    if zeros is None:
        zeros = torch.full_like(scales, float(qt.meta.get("zero", 1 << (int(qt.meta["bits"]) - 1))))
    w = (q - layout.expand(zeros.float())) * layout.expand(scales)
    return original_order(w, qt)


def stored_codes(qt: QuantizedTensor) -> torch.Tensor:
    """The integer codes (rows × cols, int32, in ``[0, 2^b)``), in the stored column order."""
    rows, cols = qt.shape
    return unpack_bits(qt.tensors["codes"], int(qt.meta["bits"]), rows * cols).view(rows, cols)


def stored_zeros(qt: QuantizedTensor) -> torch.Tensor | None:
    """An asymmetric grid's integer zero points (rows × groups, int32); None for symmetric grids."""
    if qt.meta["symmetric"]:
        return None
    scales = qt.tensors["scales"]
    return unpack_bits(qt.tensors["zeros"], int(qt.meta["bits"]), scales.numel()).view(scales.shape)


def unpermute_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Columns of ``x`` in act order (column ``j`` is original column ``perm[j]``) → original order."""
    out = torch.empty_like(x)
    out[:, perm] = x
    return out


def original_order(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """``x`` (rows × cols, in ``qt``'s stored column order) in the weight's own column order."""
    perm = qt.tensors.get("perm")
    return x if perm is None else unpermute_columns(x, _decode_perm(perm, x.shape[1]))


def _encode_perm(perm: torch.Tensor, cols: int) -> tuple[torch.Tensor, int]:
    """The act-order permutation as stored, and its exact bits: ⌈log2 cols⌉-bit packed indices
    (int32 only where an index needs more than 16 bits)."""
    b = index_bits(cols)
    if 1 <= b <= 16:
        return pack_bits(perm, b), cols * b
    return perm.to(torch.int32).contiguous(), cols * 32


def _decode_perm(perm: torch.Tensor, cols: int) -> torch.Tensor:
    if perm.dtype == torch.uint8:
        return unpack_bits(perm, index_bits(cols), cols).long()
    return perm.long()  # int32 indices (checkpoints written before the perm was packed)


def quantize_groups(
    w: torch.Tensor,
    bits: int,
    layout: GroupLayout,
    symmetric: bool,
    clip: ClipMode = "minmax",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a whole matrix: (codes, scales, zeros) with (rows × groups) params."""
    codes = torch.empty_like(w, dtype=torch.int32)
    scales = torch.empty(w.shape[0], layout.count, device=w.device)
    zeros = torch.empty_like(scales)
    for gi, (s, e) in enumerate(layout.bounds()):
        imp = None if importance is None else importance[s:e]
        scale, zero = fit_group(w[:, s:e], bits, symmetric, clip, imp)
        codes[:, s:e] = round_to_grid(w[:, s:e].float(), scale, zero, bits).to(torch.int32)
        scales[:, gi], zeros[:, gi] = scale, zero
    return codes, scales, zeros


def fake_quant(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False) -> torch.Tensor:
    """``w`` rounded to its min/max grid per group, differentiable by the straight-through
    estimator (the forward is the rounded weight, the gradient passes as if it were ``w``):
    what training that looks through a quantizer — learned rotations — sees of a layer."""
    layout = GroupLayout.make(w.shape[1], group_size)
    parts = []
    with torch.no_grad():
        for s, e in layout.bounds():
            g = w[:, s:e].detach()
            scale, zero = grid_params(g, bits, symmetric)
            parts.append(from_grid(round_to_grid(g, scale, zero, bits), scale, zero))
    return w + (torch.cat(parts, dim=1).to(w.dtype) - w).detach()


def fake_quant_lsq(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``w`` rounded to its asymmetric min/max grid per group, with LSQ-style gradients: the
    rounding is straight-through but each group's step (max − min)/(2^b − 1) stays in the graph.

    Why not :func:`fake_quant`: there the rounding error is a constant to the gradient, so a
    transform learned layer-wise (butterfly rotations) could only move a fixed error around.
    Here the error ``s·round(w/s) − w`` responds to the range the transform leaves each group —
    the quantity rotations exist to shrink.  Forward values equal min/max RTN without fp16
    rounding of the scales."""
    layout = GroupLayout.make(w.shape[1], group_size)
    maxq = float((1 << bits) - 1)
    parts = []
    for s, e in layout.bounds():
        g = w[:, s:e]
        lo = torch.clamp(g.min(dim=1, keepdim=True).values, max=0.0)
        hi = torch.clamp(g.max(dim=1, keepdim=True).values, min=0.0)
        scale = torch.clamp((hi - lo) / maxq, min=1e-12)
        zero = torch.round(-lo / scale).detach()
        u = g / scale
        r = u + (torch.round(u) - u).detach()
        parts.append((torch.clamp(r + zero, 0.0, maxq) - zero) * scale)
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- SEQ grid
def seq_zero(bits: int) -> float:
    """The SEQ grid's fixed zero point: codes ``q ∈ [0, 2^b)`` decode to ``(q − zero)·s``."""
    return (1 << (bits - 1)) - 0.5


def seq_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """SEQ codes of ``w`` (rows × k) for per-row ``scale`` (rows,) or (rows, 1): the nearest level
    ``(q − zero)·s`` is ``floor(w/s) + 2^(b−1)``, clamped to the grid."""
    if scale.ndim == w.ndim - 1:
        scale = scale.unsqueeze(-1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.floor(w / safe) + (1 << (bits - 1)), 0, (1 << bits) - 1)


def seq_fit(
    w: torch.Tensor, bits: int, layout: GroupLayout, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """fp16-exact SEQ scales (rows × groups) minimising each group's squared error (weighted per
    column by ``importance``): a search over the step ``s = c·max|w| / (2^(b−1) − ½)``, c from
    1 down to 0.1 in steps of 0.01 — at 2 bits the best step for Gaussian weights is about σ,
    c ≈ 0.36 on a 65,536-weight row, so the grid must reach far below the range."""
    w = w.float()
    top = seq_zero(bits)
    scales = torch.empty(w.shape[0], layout.count, device=w.device)
    for gi, (s, e) in enumerate(layout.bounds()):
        g = w[:, s:e]
        amax = g.abs().amax(dim=1).clamp_min(1e-8)
        col_w = None if importance is None else importance[s:e].to(w.device, torch.float32).clamp_min(0)
        best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
        best = torch.empty(w.shape[0], device=w.device)
        for c in torch.linspace(1.0, 0.1, 91).tolist():
            scale = fp16_round(amax * c / top).clamp_min(6e-8)
            err = (seq_decode_codes(seq_codes(g, scale, bits), scale, bits) - g).pow(2)
            err = (err * col_w).sum(1) if col_w is not None else err.sum(1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
        scales[:, gi] = best
    return scales


def seq_decode_codes(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if scale.ndim == q.ndim - 1:
        scale = scale.unsqueeze(-1)
    return (q - seq_zero(bits)) * scale


def seq_encode(
    method: str, w: torch.Tensor, scales: torch.Tensor, bits: int, layout: GroupLayout, extra_meta: dict
) -> QuantizedTensor:
    """``w`` rounded to the SEQ grid of ``scales`` (rows × groups, fp16-exact) and stored."""
    full = layout.expand(scales.float())
    codes = seq_codes(w.float(), full, bits).to(torch.int32)
    meta = {"zero": seq_zero(bits), "grid": "seq", **extra_meta}
    return encode(method, codes, scales, scales, bits=bits, layout=layout, symmetric=True, extra_meta=meta)


def fake_quant_seq(w: torch.Tensor, scales: torch.Tensor, bits: int, layout: GroupLayout) -> torch.Tensor:
    """``w`` on the SEQ grid of the learnable ``scales`` (rows × groups), differentiable as in
    LSQ: the floor is straight-through for ``w`` inside the grid's range (zero gradient past
    it, where clamping holds the level), and the step ``s`` stays in the graph — ∂ŵ/∂s is
    ``(q − zero) − w/s`` inside the range and the clamped level outside, which is what lets QAT
    learn the clipping range.  Forward values equal :func:`seq_encode`'s decode."""
    s = layout.expand(scales)
    u = w / s
    lo, hi = -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1)
    r = u + (torch.floor(u) - u).detach()
    return (torch.clamp(r, lo, hi) + 0.5) * s
