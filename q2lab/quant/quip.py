"""QuIP# (Tseng et al., 2024): incoherence by randomized Hadamard transforms, E8P12 lattice
vectors, BlockLDLQ error feedback; 3- and 4-bit by residual vector quantization.

Pipeline for one weight W (m × n) and its input second moment H:

1. **Incoherence.**  W̃ = U W Vᵀ and H̃ = V H Vᵀ with the seeded randomized Hadamard transforms
   of :class:`q2lab.transforms.hadamard.RHT` (the sign vectors are stored: m + n bits).  W̃'s
   entries are close to i.i.d. Gaussian, which is what a lattice codebook is built for, and
   ``tr((Ŵ−W̃) H̃ (Ŵ−W̃)ᵀ)`` is the same output error as in the original basis.
2. **Scale.**  W̃ is divided by one global scale s = RMS(W̃) / (c · c₀): c₀ is the codebook's
   MSE-optimal scale on unit Gaussians and c is searched on a grid by running BlockLDLQ on a
   seeded sample of rows and keeping the lowest proxy loss (rows are independent given H̃, so
   a row sample estimates the full loss).  s is stored (32 bits).
3. **Rounding.**  :func:`q2lab.quant.ldlq.ldlq` with g = 8; each 8-block is rounded to
   E8P12 (16 bits); the 3-bit variant adds the 1-bit E8 residual book (8 bits) on the residual
   times a fixed gain, the 4-bit one a second E8P12 (16 bits) — residual vector quantization
   as in the paper.  Codes are stored as they are (int16 / uint8 per 8 weights).

Bits per weight are exact: codes + m + n sign bits + 32 scale bits, per matrix.

Decoding is ``W = Uᵀ (s · C) V`` with C the looked-up codebook vectors.  :class:`QuipLinear`
applies this on the fly, ``y = s · Uᵀ (C (V x))``: two fast Hadamard transforms and a
codebook lookup over row chunks, never materializing the float matrix.

Layers that read the same input (q/k/v, gate/up) share V, H̃ and its Cholesky factor and are
rounded as one stacked matrix with one scale each (:meth:`Quip.quantize_stack`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from q2lab.calib.hessian import Hessian
from q2lab.codebooks import e8p
from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import MethodConfig, QuantizedTensor, StackedQuantizer, option, register
from q2lab.quant.finetune_option import FinetuneOption, finetune_option
from q2lab.quant.gptq import prepare_hessian
from q2lab.quant.ldlq import cholesky_factor, ldlq
from q2lab.quant.rht_linear import RHTLinear, stored_rht
from q2lab.transforms.hadamard import RHT, pack_signs
from q2lab.utils.threads import one_thread

G = e8p.DIM

# Per bit-width: (residual book or None, residual gain, unit-Gaussian MSE-optimal scale c₀).  The
# gains and scales are the minimisers of the Gaussian MSE (benchmarks/e8p_mse.py prints them).
_VARIANTS: dict[int, tuple[str | None, float, float]] = {
    2: (None, 1.0, 1.04),
    3: ("e8_1bit", 2.04, 0.98),
    4: ("e8p12", 3.45, 0.99),
}


@dataclass
class QuipConfig(FinetuneOption, MethodConfig):
    bits: int = option(2, "2 (E8P12), 3 (E8P12 + 1-bit E8 residual) or 4 (E8P12 + E8P12 residual)")
    seed: int = option(0, "seed of the random Hadamard sign vectors (stored, so decoding needs no seed)")
    damp: float = option(0.01, "damping added to H's diagonal, as a fraction of its mean")
    block_size: int = option(128, "columns per BlockLDLQ lazy-batch super-block")
    scale_grid: int = option(5, "global-scale candidates searched (1 = the Gaussian-optimal scale only)")
    scale_span: float = option(0.2, "the candidates span c₀·(1 ± span/2)")
    search_rows: int = option(128, "rows sampled per search candidate (0 = all rows)")
    finetune: Mapping | None = finetune_option()

    BITS_RANGE = (2, 4)

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 1):
            raise ConfigError(f"damp must be in [0, 1), got {self.damp!r}")
        for name in ("block_size", "scale_grid"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.search_rows, int) or self.search_rows < 0:
            raise ConfigError(f"search_rows must be a non-negative integer, got {self.search_rows!r}")
        if not (isinstance(self.scale_span, (int, float)) and 0 <= self.scale_span < 2):
            raise ConfigError(f"scale_span must be in [0, 2), got {self.scale_span!r}")


# --------------------------------------------------------------------------- vector codebooks
def quantize_vectors(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Round rows of ``x`` (N, 8) to the ``bits`` variant: ``(values, [codes per stage])``."""
    book, gain, _ = _VARIANTS[bits]
    v1, c1 = e8p.quantize(x)
    if book is None:
        return v1, [c1]
    r = (x - v1) * gain
    v2, c2 = e8p.quantize_e8_1bit(r) if book == "e8_1bit" else e8p.quantize(r)
    return v1 + v2 / gain, [c1, c2]


def decode_vectors(codes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Codes of each stage (same shape) → vectors (..., 8)."""
    book, gain, _ = _VARIANTS[bits]
    v = e8p.decode(_u16(codes[0]))
    if book is None:
        return v
    c2 = codes[1].long()
    v2 = e8p.e8_1bit_codebook(c2.device)[c2] if book == "e8_1bit" else e8p.decode(_u16(codes[1]))
    return v + v2 / gain


def _i16(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes in [0, 2^16) stored losslessly as int16 (two's complement)."""
    c = codes.to(torch.int32)
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


def _u16(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int32) & 0xFFFF


def stage_bits(bits: int) -> list[int]:
    """Code bits per 8-vector of each stage."""
    book = _VARIANTS[bits][0]
    return [16] if book is None else [16, 8 if book == "e8_1bit" else 16]


# --------------------------------------------------------------------------- quantizer
def _block_quantizer(row_scale: torch.Tensor, bits: int) -> Callable:
    """BlockLDLQ callable: round a (rows × 8) block in units of each row's scale."""
    s = row_scale.unsqueeze(1)

    def qb(col: int, blk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, codes = quantize_vectors(blk / s, bits)
        return v * s, torch.stack(codes, dim=1)

    return qb


def _search_scale(
    wt: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor, u: torch.Tensor, cfg: QuipConfig
) -> float:
    """The multiplier c of the Gaussian-optimal scale with the lowest BlockLDLQ proxy loss."""
    c0 = _VARIANTS[cfg.bits][2]
    if cfg.scale_grid == 1:
        return c0
    rows = wt.shape[0]
    take = rows if cfg.search_rows == 0 or cfg.search_rows >= rows else cfg.search_rows
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(rows, generator=g)[:take].to(wt.device)
    w, sg = wt[idx], sigma[idx]
    # every candidate in one BlockLDLQ run: rows are independent given H̃, so stacking the sample
    # once per candidate (each copy with its own row scales) is exact and pays the per-block
    # Python overhead once
    cands = [
        c0 * (1 - cfg.scale_span / 2 + cfg.scale_span * k / (cfg.scale_grid - 1))
        for k in range(cfg.scale_grid)
    ]
    row_scale = torch.cat([sg / c for c in cands])
    res = ldlq(
        w.repeat(len(cands), 1),
        h,
        G,
        _block_quantizer(row_scale, cfg.bits),
        block_size=cfg.block_size,
        upper=u,
    )
    err = res.values - w.repeat(len(cands), 1)
    losses = ((err @ h) * err).sum(1).view(len(cands), take).sum(1)  # tr(E H Eᵀ) per candidate
    best = min(zip(losses.tolist(), cands))
    return best[1]


def quip_quantize(weights: list[torch.Tensor], hessian: Hessian, cfg: QuipConfig) -> list[QuantizedTensor]:
    """QuIP# for weights that read the same input (one H): see the module docstring."""
    n = weights[0].shape[1]
    if n % G:
        raise ShapeError(f"quip#: {n} input features are not a multiple of {G}")
    h, _ = prepare_hessian(hessian, weights[0][:1])
    dead = torch.diagonal(hessian.xtx) == 0
    rhts = [RHT.make(w.shape[0], n, cfg.seed, device=w.device) for w in weights]
    ht = rhts[0].hessian(h)  # V is the same for every weight of the group (same n and seed)
    u = cholesky_factor(ht, cfg.damp)
    wts, sigmas = [], []
    for w, rht in zip(weights, rhts):
        w = w.detach().float().clone()
        w[:, dead.to(w.device)] = 0.0
        wt = rht.weight(w)
        wts.append(wt)
        with one_thread():  # a full reduction: its bits depend on the thread count (utils/threads.py)
            sigmas.append(wt.square().mean().sqrt().clamp_min(1e-12).expand(wt.shape[0]))
    wt, sigma = torch.cat(wts), torch.cat(sigmas)
    c = _search_scale(wt, sigma, ht, u, cfg)
    res = ldlq(wt, ht, G, _block_quantizer(sigma / c, cfg.bits), block_size=cfg.block_size, upper=u)
    stages = len(stage_bits(cfg.bits))
    codes = res.codes.view(wt.shape[0], n // G, stages)
    out, r0 = [], 0
    for w, rht, sg in zip(weights, rhts, sigmas):
        m = w.shape[0]
        out.append(_encode(codes[r0 : r0 + m], float(sg[0]) / c, rht, cfg, c))
        r0 += m
    return out


def _encode(codes: torch.Tensor, scale: float, rht: RHT, cfg: QuipConfig, c: float) -> QuantizedTensor:
    m, nb, _ = codes.shape
    n = nb * G
    tensors = {"codes": _i16(codes[..., 0])}
    bits = stage_bits(cfg.bits)
    if len(bits) == 2:
        tensors["codes2"] = codes[..., 1].to(torch.uint8) if bits[1] == 8 else _i16(codes[..., 1])
    tensors["s_in"] = pack_signs(rht.s_in)
    tensors["s_out"] = pack_signs(rht.s_out)
    tensors["scale"] = torch.tensor([scale], dtype=torch.float32)
    bit_counts = {"codes": m * nb * bits[0], "signs": m + n, "scale": 32}
    if len(bits) == 2:
        bit_counts["codes2"] = m * nb * bits[1]
    meta = {"bits": cfg.bits, "scale_mult": c, "seed": cfg.seed}
    return QuantizedTensor("quip#", (m, n), tensors, meta, bit_counts)


def _unpack(qt: QuantizedTensor) -> tuple[RHT, float, list[torch.Tensor]]:
    t = qt.tensors
    rht = stored_rht(qt)
    codes = [t["codes"]] + ([t["codes2"]] if "codes2" in t else [])
    return rht, float(t["scale"][0]), codes


def decode_rows(qt: QuantizedTensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0:r1 of C·s, the quantized weight in the Hadamard basis (W̃, float32)."""
    _, scale, codes = _unpack(qt)
    r1 = qt.shape[0] if r1 is None else r1
    v = decode_vectors([c[r0:r1] for c in codes], qt.meta["bits"])
    return v.reshape(r1 - r0, qt.shape[1]) * scale


@register("quip")
class Quip(StackedQuantizer):
    name = "quip#"
    config_cls = QuipConfig
    needs_hessian = True
    summary = "QuIP#: random Hadamard incoherence + E8P12 lattice codebook + BlockLDLQ (2/3/4-bit RVQ)"

    def quantize_stack(self, weights, hessian, cfg: QuipConfig) -> list[QuantizedTensor]:
        return quip_quantize(weights, hessian, cfg)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        rht, _, _ = _unpack(qt)
        return rht.unweight(decode_rows(qt))

    def make_linear(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache_weight: bool = True):
        return QuipLinear(qt, bias, cache_weight=cache_weight)


class QuipLinear(RHTLinear):
    """QuIP# layer: rows of W̃ are E8P12 (+ residual) codebook lookups times the scale."""

    def decode_rows(self, r0: int, r1: int) -> torch.Tensor:
        return decode_rows(self.qtensor, r0, r1)
