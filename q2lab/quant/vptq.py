"""VPTQ (Liu et al., 2024): vector post-training quantization with Hessian-weighted k-means
codebooks and second-order error feedback.

For one weight W (m × n) and its input second moment H:

1. **Vectors.**  Each row is cut into n/v vectors of ``vector_len`` consecutive input weights
   (v must divide n: a clear error otherwise, no silent padding).
2. **Codebooks.**  A main codebook of 2^(bits·v) entries is fit by weighted k-means
   (:mod:`q2lab.codebooks.kmeans`) to all the layer's vectors, each coordinate weighted by its
   input channel's H_jj — the diagonal of the output error.  An optional residual codebook
   (2^``residual_bits`` entries) is fit the same way to what the main one leaves.
3. **Rounding with error feedback.**  BlockLDLQ (:func:`q2lab.quant.ldlq.ldlq`, g = v) walks the
   vector columns left to right; each column block is rounded after the feedback of earlier
   errors, to the codeword nearest in the block's own LDL metric: with R the upper Cholesky
   factor of H⁻¹ and R_jj its v × v diagonal block, the proxy loss is Σ_j ‖η_j R_jj⁻¹‖², so
   vectors and codewords are mapped by R_jj⁻¹ and the nearest neighbour is Euclidean there —
   the exact per-block minimiser, cheap (one v × v transform of the codebook per block).  With
   v = 1 this is GPTQ with a k-means grid.  (The VPTQ paper forms vectors along the output
   dimension and feeds back column by column; vectors along the input dimension let the
   k-means weights differ per coordinate and the feedback account for the correlations inside a
   vector, the layout QuIP# and AQLM use.)
4. **Codebook tuning.**  With the codes fixed, the codebooks' entries are tuned by Adam on the
   exact proxy loss tr((W − Ŵ) H (W − Ŵ)ᵀ) (``tune_steps``; the best values seen are kept).

Stored: main codes (bits·v each), residual codes, the fp16 codebooks (counted in bpw: a 4096 × 6
book is 393,216 bits, +0.44 bpw on a 576 × 1536 SmolLM2 projection and +0.02 on 4096 × 4096).
Decoding is a gather; :class:`~q2lab.quant.vq.VQLinear` decodes row bands on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from q2lab.calib.hessian import Hessian
from q2lab.codebooks.kmeans import kmeans, nearest
from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import MethodConfig, QuantizedTensor, StackedQuantizer, option, register, require_ints
from q2lab.quant.gptq import prepare_hessian
from q2lab.quant.ldlq import cholesky_factor, ldlq
from q2lab.quant.vq import (
    VQLinear,
    adam_tune,
    check_finite,
    codebook_bits,
    load_codes,
    proxy_and_grad,
    scatter_grad,
    store_codes,
)

MAX_INDEX_BITS = 16  # 65,536 entries: the largest book VPTQ uses (and int16 codes)
# 256 entries by default: v = 8 // bits (4, 2, 2 at 2, 3, 4 bits).  Per-layer books are stored, and
# on a 135M model a 4096 × 6 fp16 book costs +0.44 bpw on a 576 × 1536 projection (+1.2 on 576 × 576);
# 256 × 4 costs +0.02.  Larger books (vector_len 6 or 8) are for larger layers.
DEFAULT_INDEX_BITS = 8


@dataclass
class VPTQConfig(MethodConfig):
    bits: int = option(2, "index bits per weight of the main codebook: it has 2^(bits·vector_len) entries")
    vector_len: int | None = option(None, "input weights per vector (default 8 // bits: a 256-entry book)")
    residual_bits: int = option(0, "index bits per vector of a residual codebook (0 = none, 8 = 256 entries)")
    kmeans_iters: int = option(25, "Lloyd iterations of each codebook's weighted k-means")
    tune_steps: int = option(50, "Adam steps on the codebooks after rounding, codes fixed (0 = none)")
    tune_lr: float = option(1e-3, "Adam learning rate of the codebook tuning, relative to the weights' RMS")
    damp: float = option(0.01, "damping added to H's diagonal, as a fraction of its mean")
    block_size: int = option(128, "columns per BlockLDLQ lazy-batch super-block")
    seed: int = option(0, "seed of the k-means++ initialisation")

    BITS_RANGE = (1, 8)

    def validate(self) -> None:
        super().validate()
        v = self.vec_len()
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"vector_len must be a positive integer, got {self.vector_len!r}")
        if self.bits * v > MAX_INDEX_BITS:
            raise ConfigError(
                f"vptq: bits × vector_len = {self.bits} × {v} = {self.bits * v} index bits; at most "
                f"{MAX_INDEX_BITS} (a 65,536-entry codebook) are supported"
            )
        if not isinstance(self.residual_bits, int) or not 0 <= self.residual_bits <= MAX_INDEX_BITS:
            raise ConfigError(
                f"residual_bits must be an integer in [0, {MAX_INDEX_BITS}], got {self.residual_bits!r}"
            )
        require_ints(self, ("kmeans_iters", "tune_steps"), 0)
        require_ints(self, ("block_size",), 1)
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 1):
            raise ConfigError(f"damp must be in [0, 1), got {self.damp!r}")
        if not (isinstance(self.tune_lr, (int, float)) and self.tune_lr > 0):
            raise ConfigError(f"tune_lr must be positive, got {self.tune_lr!r}")

    def vec_len(self) -> int:
        return self.vector_len if self.vector_len is not None else max(1, DEFAULT_INDEX_BITS // self.bits)

    def index_bits(self) -> int:
        return self.bits * self.vec_len()


# --------------------------------------------------------------------------- quantization
def _vectors(w: torch.Tensor, v: int) -> torch.Tensor:
    m, n = w.shape
    return w.reshape(m * (n // v), v)


def _coord_weights(h: torch.Tensor, m: int, v: int) -> torch.Tensor:
    """Each vector coordinate's H_jj, for every row: (m·n/v, v)."""
    d = torch.diagonal(h).clamp_min(0).reshape(1, -1, v)
    return d.expand(m, -1, -1).reshape(-1, v)


def _books(w: torch.Tensor, h: torch.Tensor, cfg: VPTQConfig) -> list[torch.Tensor]:
    """Hessian-weighted k-means: the main book, then the residual book on what it leaves."""
    v = cfg.vec_len()
    x = _vectors(w, v)
    cw = _coord_weights(h, w.shape[0], v)
    sizes = [1 << cfg.index_bits()] + ([1 << cfg.residual_bits] if cfg.residual_bits else [])
    books = []
    for i, k in enumerate(sizes):
        km = kmeans(x, k, cw, iters=cfg.kmeans_iters, seed=cfg.seed + i)
        books.append(km.centroids)
        x = x - km.centroids[km.codes]
    return books


def _block_quantizer(books: list[torch.Tensor], u: torch.Tensor, v: int):
    """BlockLDLQ callable: nearest codeword (then residual codeword) in the block's LDL metric."""

    def qb(col: int, blk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r_jj = u[col : col + v, col : col + v]
        eye = torch.eye(v, dtype=r_jj.dtype, device=r_jj.device)
        to_metric = torch.linalg.solve_triangular(r_jj, eye, upper=True)  # R_jj⁻¹
        rest, vals, codes = blk, torch.zeros_like(blk), []
        for book in books:
            c = nearest(rest @ to_metric, book @ to_metric)
            vals = vals + book[c]
            rest = blk - vals
            codes.append(c)
        return vals, torch.stack(codes, dim=1)

    return qb


def _decode(books: list[torch.Tensor], codes: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """codes (m·n/v, stages) → W (m × n)."""
    out = books[0][codes[:, 0]]
    for i in range(1, len(books)):
        out = out + books[i][codes[:, i]]
    return out.reshape(m, n)


def _tune(
    w: torch.Tensor, h: torch.Tensor, books: list[torch.Tensor], codes: torch.Tensor, cfg: VPTQConfig
) -> None:
    """Adam on the codebooks (codes fixed), exact proxy loss; updates ``books`` in place."""
    m, n = w.shape
    v = cfg.vec_len()
    params = [b.clone().requires_grad_(False) for b in books]
    rms = float(w.square().mean().sqrt().clamp_min(1e-12))

    def step() -> tuple[float, list[torch.Tensor]]:
        loss, g = proxy_and_grad(w, _decode(params, codes, m, n), h)
        gv = g.reshape(-1, v)
        return loss, [scatter_grad(gv, codes[:, i], p.shape[0]) for i, p in enumerate(params)]

    adam_tune(params, step, cfg.tune_steps, cfg.tune_lr * rms)
    for b, p in zip(books, params):
        b.copy_(p)


def vptq_quantize(weights: list[torch.Tensor], hessian: Hessian, cfg: VPTQConfig) -> list[QuantizedTensor]:
    """VPTQ for weights that read one input: one damped factorisation, a codebook per weight."""
    v = cfg.vec_len()
    n = weights[0].shape[1]
    if n % v:
        raise ShapeError(
            f"vptq: {n} input features are not a multiple of vector_len {v}; choose a divisor of {n}"
        )
    for w in weights:
        check_finite("vptq", w)
    h, _ = prepare_hessian(hessian, weights[0][:1])
    dead = torch.diagonal(hessian.xtx) == 0
    u = cholesky_factor(h, cfg.damp)
    out = []
    for w in weights:
        w = w.detach().float().clone()
        w[:, dead.to(w.device)] = 0.0
        m = w.shape[0]
        vectors = m * (n // v)
        for k in [1 << cfg.index_bits()] + ([1 << cfg.residual_bits] if cfg.residual_bits else []):
            if k > vectors:
                raise ConfigError(
                    f"vptq: a codebook of {k} entries is larger than the layer's {vectors} vectors of "
                    f"{v} weights; lower bits, vector_len or residual_bits"
                )
        books = _books(w, h, cfg)
        res = ldlq(w, h, v, _block_quantizer(books, u, v), block_size=cfg.block_size, upper=u)
        codes = res.codes.reshape(m, n // v, len(books)).reshape(-1, len(books))
        if cfg.tune_steps:
            _tune(w, h, books, codes, cfg)
        out.append(_encode(books, codes, (m, n), cfg))
    return out


def _encode(
    books: list[torch.Tensor], codes: torch.Tensor, shape: tuple[int, int], cfg: VPTQConfig
) -> QuantizedTensor:
    m, n = shape
    v = cfg.vec_len()
    count = m * (n // v)
    widths = [cfg.index_bits()] + ([cfg.residual_bits] if cfg.residual_bits else [])
    names = ["codes", "codes_res"]
    tensors, bit_counts = {}, {}
    for i, bits in enumerate(widths):
        tensors[names[i]] = store_codes(codes[:, i], bits)
        bit_counts[names[i]] = count * bits
        book = ["codebook", "codebook_res"][i]
        tensors[book] = books[i].to(torch.float16).contiguous()
        bit_counts[book] = codebook_bits(*books[i].shape)
    meta = {"bits": cfg.bits, "vector_len": v, "index_bits": widths[0], "residual_bits": cfg.residual_bits}
    return QuantizedTensor("vptq", (m, n), tensors, meta, bit_counts)


def decode_rows(qt: QuantizedTensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0:r1 of the decoded weight (float32)."""
    m, n = qt.shape
    r1 = m if r1 is None else r1
    v = int(qt.meta["vector_len"])
    per_row = n // v
    t = qt.tensors
    count = m * per_row
    out = t["codebook"].float()[
        load_codes(t["codes"], qt.meta["index_bits"], count, r0 * per_row, r1 * per_row)
    ]
    if "codes_res" in t:
        c2 = load_codes(t["codes_res"], qt.meta["residual_bits"], count, r0 * per_row, r1 * per_row)
        out = out + t["codebook_res"].float()[c2]
    return out.reshape(r1 - r0, n)


@register()
class VPTQ(StackedQuantizer):
    name = "vptq"
    config_cls = VPTQConfig
    needs_hessian = True
    summary = "VPTQ: Hessian-weighted k-means vector codebooks (+ residual book) + BlockLDLQ feedback"

    def quantize_stack(self, weights, hessian, cfg: VPTQConfig) -> list[QuantizedTensor]:
        return vptq_quantize(weights, hessian, cfg)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return decode_rows(qt)

    def make_linear(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache_weight: bool = True):
        return VQLinear(qt, bias, decode_rows, cache_weight=cache_weight)
