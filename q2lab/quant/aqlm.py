"""AQLM (Egiazarian et al., 2024): additive quantization with M learned codebooks per layer.

Each row's weights are cut into groups of ``group`` (8) consecutive input weights; a group is
the sum of M codewords, one from each codebook of 2^B entries, times the row's scale:
ŵ_{r,j} = s_r · Σ_m C_m[b_{r,j,m}].  Codes cost M·B bits per group (1×16 and 2×8 are the
2-bit presets), codebooks M·2^B·g fp16 values per layer and scales one fp16 per row, all
counted in bpw.  The objective is the layer's output error on the calibration inputs,
tr((W − Ŵ) H (W − Ŵ)ᵀ), and AQLM alternates:

1. **Codes by beam search** (vectorised over rows).  Changing the codeword of codebook m in
   group j of row r by Δ = s_r(c − c_old) changes the row's loss L by
   −2Δ·(E H)_{r,j} + Δᵀ H_jj Δ, so the new loss of every candidate c is one affine function
   of ⟨c, t_r⟩ and cᵀH_jjc — a (rows × 2^B) matrix product per group.  ``beam`` hypotheses
   per row are kept (the best ``beam`` of beam × 2^B extensions), their residual gradients
   E·H updated by a rank-g product; the best hypothesis is kept after each sweep.
2. **Codebooks and scales by Adam** on the exact objective, codes fixed (gradients by hand:
   −2(W − Ŵ)H scattered into the codewords; the best values seen are kept).

Initialisation: row scales = RMS of each row; codebooks by residual k-means (codebook m fits
what codebooks 1…m−1 leave), each coordinate weighted by its channel's H_jj
(:mod:`q2lab.codebooks.kmeans`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from q2lab.calib.hessian import Hessian
from q2lab.codebooks.kmeans import kmeans, row_min
from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import MethodConfig, QuantizedTensor, StackedQuantizer, option, register, require_ints
from q2lab.quant.finetune_option import FinetuneOption, finetune_option
from q2lab.quant.gptq import prepare_hessian
from q2lab.quant.vq import (
    FP16_BITS,
    PVRegion,
    PVView,
    VQLinear,
    adam_tune,
    check_finite,
    codebook_bits,
    load_codes,
    proxy_and_grad,
    scatter_grad,
    store_codes,
)
from q2lab.utils.threads import one_thread

SCORE_MIB = 16  # rows × beam × 2^B score block per step


@dataclass
class AQLMConfig(FinetuneOption, MethodConfig):
    bits: int = option(2, "code bits per weight: codebooks × codebook_bits / group")
    codebooks: int | None = option(None, "M additive codebooks (default bits · group / codebook_bits)")
    codebook_bits: int = option(8, "B: each codebook has 2^B entries (8 → 2×8 at 2 bits, 16 → 1×16)")
    group: int = option(8, "input weights per code group")
    beam: int = option(4, "beam width of the code search (1 = greedy coordinate descent)")
    rounds: int = option(3, "alternations of code search and codebook/scale updates (0 = k-means init only)")
    tune_steps: int = option(50, "Adam steps on codebooks and scales per round (0 = none)")
    tune_lr: float = option(1e-3, "Adam learning rate (codewords are in units of the row scale)")
    kmeans_iters: int = option(15, "Lloyd iterations of each codebook's residual k-means initialisation")
    seed: int = option(0, "seed of the k-means++ initialisation")

    finetune: Mapping | None = finetune_option()
    preset: str | None = option(None, "a named configuration: 1x16 or 2x8 (2 bits); options override it")

    BITS_RANGE = (1, 8)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {  # the AQLM README's two 2-bit layouts
        "1x16": {"bits": 2, "codebooks": 1, "codebook_bits": 16, "group": 8},
        "2x8": {"bits": 2, "codebooks": 2, "codebook_bits": 8, "group": 8},
    }

    def validate(self) -> None:
        super().validate()
        require_ints(self, ("codebook_bits", "group", "beam"), 1)
        require_ints(self, ("rounds", "tune_steps", "kmeans_iters"), 0)
        if self.codebook_bits > 16:
            raise ConfigError(f"codebook_bits must be at most 16 (65,536 entries), got {self.codebook_bits}")
        m = self.num_codebooks()
        if not isinstance(m, int) or m < 1 or m * self.codebook_bits != self.bits * self.group:
            raise ConfigError(
                f"aqlm: codebooks × codebook_bits must equal bits × group ({self.bits} × {self.group} = "
                f"{self.bits * self.group}), got {self.codebooks} × {self.codebook_bits}"
            )
        if not (isinstance(self.tune_lr, (int, float)) and self.tune_lr > 0):
            raise ConfigError(f"tune_lr must be positive, got {self.tune_lr!r}")

    def num_codebooks(self) -> int:
        if self.codebooks is not None:
            return self.codebooks
        total = self.bits * self.group
        return total // self.codebook_bits if total % self.codebook_bits == 0 else -1


# --------------------------------------------------------------------------- decoding
def _decode(books: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """books (M, K, g), codes (rows, G, M), scales (rows,) → Ŵ (rows, G·g)."""
    rows, _groups, m = codes.shape
    vec = books[0][codes[..., 0]]
    for i in range(1, m):
        vec = vec + books[i][codes[..., i]]
    return vec.reshape(rows, -1) * scales.unsqueeze(1)


def decode_rows(qt: QuantizedTensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0:r1 of the decoded weight (float32)."""
    rows, n = qt.shape
    r1 = rows if r1 is None else r1
    meta, t = qt.meta, qt.tensors
    m, b, g = int(meta["codebooks"]), int(meta["codebook_bits"]), int(meta["group"])
    per_row = n // g * m
    codes = load_codes(t["codes"], b, rows * per_row, r0 * per_row, r1 * per_row).view(r1 - r0, n // g, m)
    return _decode(t["codebooks"].float(), codes, t["scales"][r0:r1].float())


# --------------------------------------------------------------------------- quantization
def _init(wn: torch.Tensor, diag: torch.Tensor, cfg: AQLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual weighted k-means: (books (M, K, g), codes (rows, G, M))."""
    rows, n = wn.shape
    g, m, k = cfg.group, cfg.num_codebooks(), 1 << cfg.codebook_bits
    x = wn.reshape(-1, g)
    cw = diag.reshape(1, -1, g).expand(rows, -1, -1).reshape(-1, g)
    books, codes = [], []
    for i in range(m):
        km = kmeans(x, k, cw, iters=cfg.kmeans_iters, seed=cfg.seed + i)
        books.append(km.centroids)
        codes.append(km.codes)
        x = x - km.centroids[km.codes]
    return torch.stack(books), torch.stack(codes, dim=1).view(rows, n // g, m)


def beam_search(
    w: torch.Tensor,
    h: torch.Tensor,
    books: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    beam: int,
) -> torch.Tensor:
    """One sweep over groups and codebooks; returns the best codes found per row (see module
    doc).  Rows are independent, so they are processed in bands sized to ``SCORE_MIB``."""
    rows = w.shape[0]
    k = books.shape[1]
    band = max(1, (SCORE_MIB << 20) // (4 * beam * k))
    out = [
        _beam_band(w[r : r + band], h, books, codes[r : r + band], scales[r : r + band], beam)
        for r in range(0, rows, band)
    ]
    return torch.cat(out)


def _beam_band(
    w: torch.Tensor, h: torch.Tensor, books: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, beam: int
) -> torch.Tensor:
    rows, groups, m = codes.shape
    k, g = books.shape[1], books.shape[2]
    e = w - _decode(books, codes, s)
    grad = e @ h  # (rows, n): (E H) per row
    loss = (e * grad).sum(1)
    # hypotheses: (rows, beam, ...); copies beyond the first start at +inf so the first step fans out
    hc = codes.unsqueeze(1).expand(rows, beam, groups, m).clone()
    hg = grad.unsqueeze(1).expand(rows, beam, -1).clone()
    hl = loss.unsqueeze(1).repeat(1, beam)
    hl[:, 1:] = float("inf")
    sv = s.view(rows, 1, 1)
    ridx = torch.arange(rows).unsqueeze(1)
    for j in range(groups):
        sl = slice(j * g, (j + 1) * g)
        hjj = h[sl, sl]
        for i in range(m):
            book = books[i]
            q = ((book @ hjj) * book).sum(1)  # cᵀ H_jj c for every codeword
            old = book[hc[:, :, j, i]]  # (rows, beam, g)
            ho = old @ hjj
            gj = hg[:, :, sl]
            t = gj + sv * ho
            base = hl + 2 * sv.squeeze(2) * (old * gj).sum(2) + sv.squeeze(2) ** 2 * (old * ho).sum(2)
            scores = base.unsqueeze(2) + (sv**2) * q - 2 * sv * (t @ book.T)  # (rows, beam, K)
            flat = scores.reshape(rows, beam * k)
            if beam == 1:
                best, pick = row_min(flat)
                best, pick = best.unsqueeze(1), pick.unsqueeze(1)
            else:
                best, pick = flat.topk(beam, dim=1, largest=False, sorted=True)
            parent, code = pick // k, pick % k
            hc = hc[ridx, parent]
            hg = hg[ridx, parent]
            delta = sv * (book[code] - old[ridx, parent])  # (rows, beam, g)
            hc[:, :, j, i] = code
            hg = hg - delta @ h[sl, :]
            hl = best
    top = hl.argmin(dim=1)
    return hc[torch.arange(rows), top]


def _tune(
    w: torch.Tensor,
    h: torch.Tensor,
    books: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    cfg: AQLMConfig,
) -> float:
    """Adam on codebooks and scales, codes fixed; updates them in place, returns the loss."""
    _rows, _groups, m = codes.shape
    g, k = cfg.group, books.shape[1]
    flat_codes = codes.reshape(-1, m)

    def step() -> tuple[float, list[torch.Tensor]]:
        w_hat = _decode(books, codes, scales)
        loss, grad = proxy_and_grad(w, w_hat, h)
        gs = (grad * w_hat).sum(1) / scales.clamp_min(1e-12)  # ∂/∂s_r: Ŵ_r / s_r is the unscaled sum
        gv = (grad * scales.unsqueeze(1)).reshape(-1, g)
        gb = torch.stack([scatter_grad(gv, flat_codes[:, i], k) for i in range(m)])
        return loss, [gb, gs]

    return adam_tune([books, scales], step, cfg.tune_steps, cfg.tune_lr)


def aqlm_quantize(weights: list[torch.Tensor], hessian: Hessian, cfg: AQLMConfig) -> list[QuantizedTensor]:
    n = weights[0].shape[1]
    g = cfg.group
    if n % g:
        raise ShapeError(f"aqlm: {n} input features are not a multiple of the group size {g}")
    for w in weights:
        check_finite("aqlm", w)
    h, _ = prepare_hessian(hessian, weights[0][:1])
    h = h / torch.diagonal(h).mean().clamp_min(1e-12)
    dead = torch.diagonal(hessian.xtx) == 0
    k = 1 << cfg.codebook_bits
    out = []
    for w in weights:
        w = w.detach().float().clone()
        w[:, dead.to(w.device)] = 0.0
        rows = w.shape[0]
        if k > rows * n // g:
            raise ConfigError(
                f"aqlm: a codebook of {k} entries is larger than the layer's {rows * n // g} groups of "
                f"{g} weights; lower codebook_bits"
            )
        with one_thread():
            scales = w.square().mean(1).sqrt().clamp_min(1e-8)
        books, codes = _init(w / scales.unsqueeze(1), torch.diagonal(h), cfg)
        for _ in range(cfg.rounds):
            codes = beam_search(w, h, books, codes, scales, cfg.beam)
            if cfg.tune_steps:
                _tune(w, h, books, codes, scales, cfg)
        out.append(_encode(books, codes, scales, (rows, n), cfg))
    return out


def pv_view(qt: QuantizedTensor) -> PVView:
    """The layer for PV-tuning: books and row scales continuous, one region of M-stage codes."""
    rows, n = qt.shape
    m, b, g = int(qt.meta["codebooks"]), int(qt.meta["codebook_bits"]), int(qt.meta["group"])
    groups = n // g
    t = qt.tensors
    codes = load_codes(t["codes"], b, rows * groups * m).view(rows * groups, m)
    params = {"codebooks": t["codebooks"].float().clone(), "scales": t["scales"].float().clone()}

    def decode(p: dict[str, torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
        return _decode(p["codebooks"], c[0].view(rows, groups, m), p["scales"])

    def targets(w: torch.Tensor, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        s = p["scales"].detach().clamp_min(1e-12)
        return (w / s.unsqueeze(1)).reshape(-1, g), s.square().repeat_interleave(groups)

    def store(p: dict[str, torch.Tensor], c: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "codes": store_codes(c[0].reshape(-1), b),
            "codebooks": p["codebooks"].detach().to(torch.float16).contiguous(),
            "scales": p["scales"].detach().to(torch.float16).contiguous(),
        }

    region = PVRegion(lambda p: list(p["codebooks"]), codes, targets)
    return PVView(qt, params, [region], decode, store)


def _encode(books, codes, scales, shape: tuple[int, int], cfg: AQLMConfig) -> QuantizedTensor:
    rows, n = shape
    m, b = cfg.num_codebooks(), cfg.codebook_bits
    count = codes.numel()
    tensors = {
        "codes": store_codes(codes.reshape(-1), b),
        "codebooks": books.to(torch.float16).contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
    }
    bit_counts = {
        "codes": count * b,
        "codebooks": m * codebook_bits(1 << b, cfg.group),
        "scales": rows * FP16_BITS,
    }
    meta = {"bits": cfg.bits, "codebooks": m, "codebook_bits": b, "group": cfg.group}
    return QuantizedTensor("aqlm", (rows, n), tensors, meta, bit_counts)


@register()
class AQLM(StackedQuantizer):
    name = "aqlm"
    config_cls = AQLMConfig
    needs_hessian = True
    summary = (
        "AQLM: M additive codebooks over groups of 8 + row scales; beam search + Adam on the output error"
    )

    def quantize_stack(self, weights, hessian, cfg: AQLMConfig) -> list[QuantizedTensor]:
        return aqlm_quantize(weights, hessian, cfg)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return decode_rows(qt)

    def pv_view(self, qt: QuantizedTensor) -> PVView:
        return pv_view(qt)

    def make_linear(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache_weight: bool = True):
        return VQLinear(qt, bias, decode_rows, cache_weight=cache_weight)
