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
5. **Outlier columns** (``outlier_cols`` k > 0, or ``outlier_pct`` % of the inputs: the
   paper's outlier extension).  The k input channels with the largest H_jj — those whose errors
   weigh most in the output — get their own book of ``outlier_vector_len``-vectors at
   ``outlier_bits`` per weight.  They come first in the column order BlockLDLQ walks (blocks of
   the outlier length, then of v: :func:`~q2lab.quant.ldlq.ldlq` takes a sequence of block
   widths), so their errors are fed back into every other column; the selection depends on H
   only, so one factorisation serves a stack.  Stored: their codes, their book, and the k
   column indices (⌈log2 n⌉ bits each).

Stored: main codes (bits·v each), residual codes, the fp16 codebooks (counted in bpw: a 4096 × 6
book is 393,216 bits, +0.44 bpw on a 576 × 1536 SmolLM2 projection and +0.02 on 4096 × 4096).
Decoding is a gather; :class:`~q2lab.quant.vq.VQLinear` decodes row bands on the fly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from q2lab.calib.hessian import Hessian
from q2lab.codebooks.kmeans import kmeans, nearest
from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import MethodConfig, QuantizedTensor, StackedQuantizer, option, register, require_ints
from q2lab.quant.finetune_option import FinetuneOption, finetune_option
from q2lab.quant.gptq import prepare_hessian
from q2lab.quant.ldlq import cholesky_factor, ldlq
from q2lab.quant.vq import (
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

MAX_INDEX_BITS = 16  # 65,536 entries: the largest book VPTQ uses (and int16 codes)
# 256 entries by default: v = 8 // bits (4, 2, 2 at 2, 3, 4 bits).  Per-layer books are stored, and
# on a 135M model a 4096 × 6 fp16 book costs +0.44 bpw on a 576 × 1536 projection (+1.2 on 576 × 576);
# 256 × 4 costs +0.02.  Larger books (vector_len 6 or 8) are for larger layers.
DEFAULT_INDEX_BITS = 8


@dataclass
class VPTQConfig(FinetuneOption, MethodConfig):
    bits: int = option(2, "index bits per weight of the main codebook: it has 2^(bits·vector_len) entries")
    vector_len: int | None = option(None, "input weights per vector (default 8 // bits: a 256-entry book)")
    residual_bits: int = option(0, "index bits per vector of a residual codebook (0 = none, 8 = 256 entries)")
    outlier_cols: int = option(0, "input columns with the largest H_jj kept in their own codebook (0 = none)")
    outlier_pct: float = option(0.0, "outlier columns as a percent of the inputs (instead of outlier_cols)")
    outlier_vector_len: int = option(2, "weights per vector of the outlier columns' codebook")
    outlier_bits: int = option(4, "index bits per weight of the outlier codebook: 2^(bits·length) entries")
    kmeans_iters: int = option(25, "Lloyd iterations of each codebook's weighted k-means")
    tune_steps: int = option(50, "Adam steps on the codebooks after rounding, codes fixed (0 = none)")
    tune_lr: float = option(1e-3, "Adam learning rate of the codebook tuning, relative to the weights' RMS")
    damp: float = option(0.01, "damping added to H's diagonal, as a fraction of its mean")
    block_size: int = option(128, "columns per BlockLDLQ lazy-batch super-block")
    seed: int = option(0, "seed of the k-means++ initialisation")
    finetune: Mapping | None = finetune_option()
    preset: str | None = option(None, "a named configuration (see PRESETS); explicit options override it")

    BITS_RANGE = (1, 8)
    # Named after the VPTQ-community checkpoints: v{vector_len}-k{main entries}-{residual entries}.
    # Index bits per weight: v8-k65536-0 2.0; v8-k65536-256 3.0 (2 + 1 — the Polish study's
    # configuration); v6-k4096 2.0 with a 64× smaller book; v6-k4096-o1 adds the tech report's
    # 1 % outlier columns in a v4 / 4096 book (its Llama-3-8B 2.24-bpw row).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "v8-k65536-0": {"bits": 2, "vector_len": 8},
        "v8-k65536-256": {"bits": 2, "vector_len": 8, "residual_bits": 8},
        "study": {"bits": 2, "vector_len": 8, "residual_bits": 8},
        "v6-k4096": {"bits": 2, "vector_len": 6},
        "v6-k4096-o1": {
            "bits": 2,
            "vector_len": 6,
            "outlier_pct": 1.0,
            "outlier_vector_len": 4,
            "outlier_bits": 3,
        },
    }

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
        require_ints(self, ("kmeans_iters", "tune_steps", "outlier_cols"), 0)
        require_ints(self, ("block_size", "outlier_vector_len", "outlier_bits"), 1)
        if self.outlier_cols % self.outlier_vector_len:
            raise ConfigError(
                f"outlier_cols ({self.outlier_cols}) must be a multiple of outlier_vector_len "
                f"({self.outlier_vector_len})"
            )
        if self.outlier_bits * self.outlier_vector_len > MAX_INDEX_BITS:
            raise ConfigError(
                f"vptq: outlier_bits × outlier_vector_len = {self.outlier_bits * self.outlier_vector_len} "
                f"index bits; at most {MAX_INDEX_BITS} are supported"
            )
        if not (isinstance(self.outlier_pct, (int, float)) and 0 <= self.outlier_pct < 50):
            raise ConfigError(f"outlier_pct must be in [0, 50), got {self.outlier_pct!r}")
        if self.outlier_pct and self.outlier_cols:
            raise ConfigError("give outlier_cols or outlier_pct, not both")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 1):
            raise ConfigError(f"damp must be in [0, 1), got {self.damp!r}")
        if not (isinstance(self.tune_lr, (int, float)) and self.tune_lr > 0):
            raise ConfigError(f"tune_lr must be positive, got {self.tune_lr!r}")

    def vec_len(self) -> int:
        return self.vector_len if self.vector_len is not None else max(1, DEFAULT_INDEX_BITS // self.bits)

    def index_bits(self) -> int:
        return self.bits * self.vec_len()

    def outlier_index_bits(self) -> int:
        return self.outlier_bits * self.outlier_vector_len


# --------------------------------------------------------------------------- quantization
def _vectors(w: torch.Tensor, v: int) -> torch.Tensor:
    m, n = w.shape
    return w.reshape(m * (n // v), v)


def _coord_weights(d: torch.Tensor, m: int, v: int) -> torch.Tensor:
    """Each vector coordinate's H_jj (``d``: the region's Hessian diagonal), for every row."""
    return d.clamp_min(0).reshape(1, -1, v).expand(m, -1, -1).reshape(-1, v)


def _fit_books(
    w: torch.Tensor, d: torch.Tensor, v: int, sizes: list[int], cfg: VPTQConfig
) -> list[torch.Tensor]:
    """Hessian-weighted k-means of ``w``'s v-vectors: a book per size, each fit to what the
    previous ones leave (main, then residual)."""
    x = _vectors(w, v)
    cw = _coord_weights(d, w.shape[0], v)
    books = []
    for i, k in enumerate(sizes):
        km = kmeans(x, k, cw, iters=cfg.kmeans_iters, seed=cfg.seed + i)
        books.append(km.centroids)
        x = x - km.centroids[km.codes]
    return books


@dataclass
class _Layout:
    """Column order and vector lengths of one stack: outlier columns (largest H_jj, ascending
    index) first in vectors of ``vo``, then the rest in natural order in vectors of ``v``."""

    n: int
    v: int
    vo: int
    outliers: torch.Tensor  # (k,) int64 column indices; empty when none
    perm: torch.Tensor  # (n,) the order BlockLDLQ walks

    @property
    def k(self) -> int:
        return int(self.outliers.numel())

    def widths(self) -> list[int]:
        return [self.vo] * (self.k // self.vo) + [self.v] * ((self.n - self.k) // self.v)


def _outlier_count(n: int, cfg: VPTQConfig) -> int:
    """Outlier columns for ``n`` inputs: ``outlier_cols``, or the feasible count (a multiple of
    ``outlier_vector_len`` leaving a multiple of ``vector_len``) nearest ``outlier_pct`` % of n."""
    if not cfg.outlier_pct:
        return cfg.outlier_cols
    v, vo, target = cfg.vec_len(), cfg.outlier_vector_len, cfg.outlier_pct * n / 100
    feasible = [k for k in range(vo, n, vo) if (n - k) % v == 0]
    if not feasible:
        raise ShapeError(
            f"vptq: no outlier column count for {n} input features is a multiple of outlier_vector_len "
            f"{vo} and leaves a multiple of vector_len {v}"
        )
    return min(feasible, key=lambda k: (abs(k - target), k))


def _layout(h_diag: torch.Tensor, n: int, cfg: VPTQConfig) -> _Layout:
    v, k = cfg.vec_len(), _outlier_count(n, cfg)
    if k >= n:
        raise ShapeError(f"vptq: outlier_cols ({k}) must be fewer than the layer's {n} input features")
    if (n - k) % v:
        raise ShapeError(
            f"vptq: {n - k} input features (after {k} outlier columns) are not a multiple of vector_len {v}; "
            f"choose a divisor of {n - k}"
        )
    out = torch.sort(torch.argsort(h_diag, descending=True, stable=True)[:k]).values
    rest = torch.ones(n, dtype=torch.bool)
    rest[out] = False
    perm = torch.cat([out, torch.arange(n)[rest]])
    return _Layout(n, v, cfg.outlier_vector_len, out, perm)


def _check_sizes(m: int, lay: _Layout, cfg: VPTQConfig) -> None:
    regions = [(m * ((lay.n - lay.k) // lay.v), lay.v, [1 << cfg.index_bits()])]
    if cfg.residual_bits:
        regions[0][2].append(1 << cfg.residual_bits)
    if lay.k:
        regions.append((m * (lay.k // lay.vo), lay.vo, [1 << cfg.outlier_index_bits()]))
    for vectors, v, sizes in regions:
        for k in sizes:
            if k > vectors:
                raise ConfigError(
                    f"vptq: a codebook of {k} entries is larger than the layer's {vectors} vectors of "
                    f"{v} weights; lower bits, vector_len, residual_bits or outlier_bits"
                )


def _block_quantizer(books: list[torch.Tensor], out_books: list[torch.Tensor], u: torch.Tensor, k: int):
    """BlockLDLQ callable: nearest codeword (then residual codeword) in the block's LDL metric;
    blocks left of column ``k`` are outlier vectors and use ``out_books``."""

    def qb(col: int, blk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = blk.shape[1]
        r_jj = u[col : col + v, col : col + v]
        eye = torch.eye(v, dtype=r_jj.dtype, device=r_jj.device)
        to_metric = torch.linalg.solve_triangular(r_jj, eye, upper=True)  # R_jj⁻¹
        rest, vals, codes = blk, torch.zeros_like(blk), []
        for book in out_books if col < k else books:
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


@dataclass
class _Codes:
    """One weight's codes in BlockLDLQ's column order: main (m·(n−k)/v, stages), outlier (m·k/vo, 1)."""

    main: torch.Tensor
    out: torch.Tensor | None


def _split_codes(codes: torch.Tensor, m: int, lay: _Layout, stages: int) -> _Codes:
    ko = lay.k // lay.vo
    main = codes[:, ko:].reshape(m, (lay.n - lay.k) // lay.v, stages).reshape(-1, stages)
    return _Codes(main.contiguous(), codes[:, :ko].reshape(-1, 1).contiguous() if ko else None)


def _decode_ordered(
    books: list[torch.Tensor], out_books: list[torch.Tensor], c: _Codes, m: int, lay: _Layout
):
    """The quantized weight in BlockLDLQ's column order (outlier columns first)."""
    main = _decode(books, c.main, m, lay.n - lay.k)
    if c.out is None:
        return main
    return torch.cat([_decode(out_books, c.out, m, lay.k), main], dim=1)


def _tune(
    w: torch.Tensor,
    h: torch.Tensor,
    books: list[torch.Tensor],
    out_books: list[torch.Tensor],
    c: _Codes,
    lay: _Layout,
    cfg: VPTQConfig,
) -> None:
    """Adam on every codebook (codes fixed), exact proxy loss in the permuted order (``w``, ``h``
    permuted alike); updates the books in place."""
    m = w.shape[0]
    params = [b.clone() for b in books + out_books]
    nb = len(books)
    rms = float(w.square().mean().sqrt().clamp_min(1e-12))

    def step() -> tuple[float, list[torch.Tensor]]:
        loss, g = proxy_and_grad(w, _decode_ordered(params[:nb], params[nb:], c, m, lay), h)
        gm = g[:, lay.k :].reshape(-1, lay.v)
        grads = [scatter_grad(gm, c.main[:, i], p.shape[0]) for i, p in enumerate(params[:nb])]
        if c.out is not None:
            grads.append(scatter_grad(g[:, : lay.k].reshape(-1, lay.vo), c.out[:, 0], params[nb].shape[0]))
        return loss, grads

    adam_tune(params, step, cfg.tune_steps, cfg.tune_lr * rms)
    for b, p in zip(books + out_books, params):
        b.copy_(p)


def vptq_quantize(weights: list[torch.Tensor], hessian: Hessian, cfg: VPTQConfig) -> list[QuantizedTensor]:
    """VPTQ for weights that read one input: one damped factorisation, a codebook per weight."""
    n = weights[0].shape[1]
    for w in weights:
        check_finite("vptq", w)
    h, _ = prepare_hessian(hessian, weights[0][:1])
    lay = _layout(torch.diagonal(h).cpu(), n, cfg)
    for w in weights:
        _check_sizes(w.shape[0], lay, cfg)
    dead = torch.diagonal(hessian.xtx) == 0
    perm = lay.perm.to(h.device)
    hp = h[perm][:, perm]
    u = cholesky_factor(hp, cfg.damp)
    d = torch.diagonal(hp)
    sizes = [1 << cfg.index_bits()] + ([1 << cfg.residual_bits] if cfg.residual_bits else [])
    out = []
    for w in weights:
        w = w.detach().float().clone()
        w[:, dead.to(w.device)] = 0.0
        wp = w[:, perm.to(w.device)]
        m, k = w.shape[0], lay.k
        books = _fit_books(wp[:, k:], d[k:], lay.v, sizes, cfg)
        out_books = _fit_books(wp[:, :k], d[:k], lay.vo, [1 << cfg.outlier_index_bits()], cfg) if k else []
        res = ldlq(
            wp, hp, lay.widths(), _block_quantizer(books, out_books, u, k), block_size=cfg.block_size, upper=u
        )
        codes = _split_codes(res.codes, m, lay, len(books))
        if cfg.tune_steps:
            _tune(wp, hp, books, out_books, codes, lay, cfg)
        out.append(_encode(books, out_books, codes, (m, n), lay, cfg))
    return out


def _encode(
    books: list[torch.Tensor],
    out_books: list[torch.Tensor],
    c: _Codes,
    shape: tuple[int, int],
    lay: _Layout,
    cfg: VPTQConfig,
) -> QuantizedTensor:
    m, n = shape
    count = m * ((n - lay.k) // lay.v)
    widths = [cfg.index_bits()] + ([cfg.residual_bits] if cfg.residual_bits else [])
    tensors, bit_counts = {}, {}
    for i, bits in enumerate(widths):
        code_name, book_name = ("codes", "codebook") if i == 0 else ("codes_res", "codebook_res")
        tensors[code_name] = store_codes(c.main[:, i], bits)
        bit_counts[code_name] = count * bits
        tensors[book_name] = books[i].to(torch.float16).contiguous()
        bit_counts[book_name] = codebook_bits(*books[i].shape)
    meta = {
        "bits": cfg.bits,
        "vector_len": lay.v,
        "index_bits": widths[0],
        "residual_bits": cfg.residual_bits,
        "outlier_cols": lay.k,
    }
    if lay.k:
        ob = cfg.outlier_index_bits()
        tensors["codes_out"] = store_codes(c.out[:, 0], ob)
        bit_counts["codes_out"] = m * (lay.k // lay.vo) * ob
        tensors["codebook_out"] = out_books[0].to(torch.float16).contiguous()
        bit_counts["codebook_out"] = codebook_bits(*out_books[0].shape)
        tensors["outlier_idx"] = lay.outliers.to(torch.int32)
        bit_counts["outlier_idx"] = lay.k * max(1, math.ceil(math.log2(n)))
        meta.update(outlier_vector_len=lay.vo, outlier_index_bits=ob)
    return QuantizedTensor("vptq", (m, n), tensors, meta, bit_counts)


def decode_rows(qt: QuantizedTensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0:r1 of the decoded weight (float32)."""
    m, n = qt.shape
    r1 = m if r1 is None else r1
    t, meta = qt.tensors, qt.meta
    k = int(meta.get("outlier_cols", 0))
    main = _decode_region(t, "", meta["index_bits"], int(meta["vector_len"]), m, n - k, r0, r1)
    if "codes_res" in t:
        main = main + _decode_region(
            t, "_res", meta["residual_bits"], int(meta["vector_len"]), m, n - k, r0, r1
        )
    if not k:
        return main
    idx = t["outlier_idx"].long()
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    full = torch.empty(r1 - r0, n)
    full[:, rest] = main
    full[:, idx] = _decode_region(
        t, "_out", meta["outlier_index_bits"], int(meta["outlier_vector_len"]), m, k, r0, r1
    )
    return full


def pv_view(qt: QuantizedTensor) -> PVView:
    """The layer for PV-tuning: every codebook continuous; regions of main (+ residual) codes
    over the non-outlier columns and of outlier codes over the outlier columns."""
    m, n = qt.shape
    t, meta = qt.tensors, qt.meta
    k, v = int(meta.get("outlier_cols", 0)), int(meta["vector_len"])
    count = m * ((n - k) // v)
    stages = [("", int(meta["index_bits"]))]
    if "codes_res" in t:
        stages.append(("_res", int(meta["residual_bits"])))
    main = torch.stack([load_codes(t["codes" + sfx], bits, count) for sfx, bits in stages], dim=1)
    names = ["codebook" + sfx for sfx, _ in stages]
    params = {name: t[name].float().clone() for name in names}
    idx = t["outlier_idx"].long() if k else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    rest = torch.arange(n)[keep]
    inv = torch.argsort(torch.cat([idx, rest]))

    def main_targets(w: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = w[:, rest].reshape(-1, v)
        return x, torch.ones(x.shape[0])

    regions = [PVRegion(lambda p: [p[name] for name in names], main, main_targets)]
    if k:
        vo, ob = int(meta["outlier_vector_len"]), int(meta["outlier_index_bits"])
        params["codebook_out"] = t["codebook_out"].float().clone()

        def out_targets(w: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
            x = w[:, idx].reshape(-1, vo)
            return x, torch.ones(x.shape[0])

        out_codes = load_codes(t["codes_out"], ob, m * (k // vo)).unsqueeze(1)
        regions.append(PVRegion(lambda p: [p["codebook_out"]], out_codes, out_targets))

    def decode(p: dict[str, torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
        w = _decode([p[name] for name in names], c[0], m, n - k)
        if not k:
            return w
        return torch.cat([_decode([p["codebook_out"]], c[1], m, k), w], dim=1)[:, inv]

    def store(p: dict[str, torch.Tensor], c: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {name: p[name].detach().to(torch.float16).contiguous() for name in p}
        for i, (sfx, bits) in enumerate(stages):
            out["codes" + sfx] = store_codes(c[0][:, i], bits)
        if k:
            out["codes_out"] = store_codes(c[1][:, 0], int(meta["outlier_index_bits"]))
        return out

    return PVView(qt, params, regions, decode, store)


def _decode_region(t: dict, suffix: str, bits: int, v: int, m: int, n: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of one codebook's part: its columns only (``n`` of them, vectors of ``v``)."""
    per_row = n // v
    codes = load_codes(t["codes" + suffix], bits, m * per_row, r0 * per_row, r1 * per_row)
    return t["codebook" + suffix].float()[codes].reshape(r1 - r0, n)


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

    def pv_view(self, qt: QuantizedTensor) -> PVView:
        return pv_view(qt)

    def make_linear(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache_weight: bool = True):
        return VQLinear(qt, bias, decode_rows, cache_weight=cache_weight)
