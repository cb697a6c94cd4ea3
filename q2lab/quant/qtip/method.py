"""The ``qtip`` method: RHT incoherence + BlockLDLQ over trellis tiles (QTIP, Tseng et al. 2024).

Pipeline for one weight W (m × n) with input second moment H:

1. Incoherence: W̃ = U W Vᵀ, H̃ = V H Vᵀ with the shared randomized Hadamard transform
   (:class:`q2lab.transforms.hadamard.RHT`); W̃'s entries are close to i.i.d. Gaussian.
2. One fp16 scale per matrix, s = rms(W̃)/α, so W̃/s matches the unit-RMS code (α is the best
   global scale for Gaussian data measured by benchmarks/qtip_rate_distortion.py).
3. BlockLDLQ (:mod:`q2lab.quant.ldlq`) with g = ``tile_cols`` columns: each error-fed
   (m × g) column block is cut into ``tile_rows`` × g tiles, and each tile, read row-major, is
   one trellis sequence of T = tile_rows·g weights (16 × 16 = 256 as in the paper),
   quantized by tail-biting Viterbi (:mod:`.viterbi`).
4. Storage: the trellis chunks, exactly k bits per weight (tail-biting: no extra state bits),
   the two sign vectors (m + n bits), the fp16 scale, and for the HYB code its 2^Q × 2 fp16
   table.  bpw counts all of it.

Decoding (:func:`decode_rows`; :class:`QTIPLinear` decodes row bands on the fly)
rebuilds the states by shifting, looks the values up (a kernel would compute them from the
state), rescales and undoes the RHT.

CPU defaults.  Viterbi work grows as 2^L per weight.  At L = 16 (the paper's setting) one
SmolLM2-135M pass is hours on 2 CPU cores, so the default is ``L = 8`` with the ``1mad`` code
(the best code at L ≤ 10 in benchmarks/qtip_rate_distortion.py; 3INST wins from L = 12); the
timing is in docs/DESIGN.md.  Pass ``L: 16`` on a GPU or for the best quality.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import MethodConfig, QuantizedTensor, StackedQuantizer, option, register
from q2lab.quant.finetune_option import FinetuneOption, finetune_option
from q2lab.quant.gptq import prepare_hessian
from q2lab.quant.ldlq import cholesky_factor, ldlq
from q2lab.quant.qtip.codes import CODES, code_dims, code_table, hyb, hyb_lut
from q2lab.quant.qtip.trellis import Trellis
from q2lab.quant.qtip.viterbi import DEFAULT_MAX_BYTES, decode, quantize_sequences
from q2lab.quant.rht_linear import RHTLinear, stored_rht
from q2lab.transforms.hadamard import RHT, factor, pack_signs
from q2lab.utils.packing import pack_bits, unpack_bits
from q2lab.utils.threads import one_thread

# Best global scale α for N(0, 1) data (the code quantizes α·x), measured with
# benchmarks/qtip_rate_distortion.py (2 bits: 0.95 up to L = 12, 1.0 from L = 14; 3 and 4 bits:
# 0.9 at L = 11, 12).


def _default_alpha(bits: int, L: int) -> float:
    if bits == 2:
        return 1.0 if L >= 14 else 0.95
    return 0.9 if bits in (3, 4) else 1.0


@dataclass
class QTIPConfig(FinetuneOption, MethodConfig):
    bits: int = option(2, "bits per weight k of the trellis (1..4)")
    L: int = option(8, "trellis state bits (paper: 16; 8 is the 2-core CPU default, see docs)")
    code: str = option("1mad", "trellis code: 1mad, 3inst (computed), hyb (V=2, small table), gauss")
    tile_rows: int = option(16, "rows per trellis tile (sequence length = tile_rows × tile_cols)")
    tile_cols: int = option(16, "columns per tile = the BlockLDLQ block size g")
    damp: float = option(0.01, "damping added to H's diagonal, as a fraction of its mean")
    alpha: float | None = option(None, "global scale: W̃·α/rms(W̃) is coded; null = Gaussian-optimal")
    hyb_q: int = option(9, "table index bits Q of the HYB code")
    seed: int = option(0, "seed of the RHT sign vectors (and of the gauss codebook)")
    tb_warmup: int | None = option(32, "tail-biting first pass: steps either side of the wrap (null = all)")
    max_mib: int = option(DEFAULT_MAX_BYTES >> 20, "memory bound of one Viterbi chunk (MiB)")
    finetune: Mapping | None = finetune_option()

    BITS_RANGE = (1, 4)

    def validate(self) -> None:
        super().validate()
        if self.code not in CODES:
            raise ConfigError(f"code must be one of {', '.join(CODES)}, got {self.code!r}")
        Trellis(self.L, self.bits, code_dims(self.code))  # raises ConfigError on a bad L
        if self.tb_warmup is not None and (not isinstance(self.tb_warmup, int) or self.tb_warmup < 1):
            raise ConfigError(f"tb_warmup must be a positive integer or null, got {self.tb_warmup!r}")
        for name in ("tile_rows", "tile_cols", "max_mib"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 1):
            raise ConfigError(f"damp must be in [0, 1), got {self.damp!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"alpha must be positive or null, got {self.alpha!r}")
        if not 1 <= self.hyb_q <= 14:
            raise ConfigError(f"hyb_q must be in [1, 14], got {self.hyb_q!r}")

    @property
    def trellis(self) -> Trellis:
        return Trellis(self.L, self.bits, code_dims(self.code))

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else _default_alpha(self.bits, self.L)


def _table(code: str, L: int, seed: int, lut: torch.Tensor | None) -> torch.Tensor:
    if code == "hyb":
        assert lut is not None
        return hyb(torch.arange(1 << L), lut.float())
    return code_table(code, L, seed=seed)


@register()
class QTIP(StackedQuantizer):
    name = "qtip"
    config_cls = QTIPConfig
    needs_hessian = True
    summary = "QTIP: RHT incoherence + BlockLDLQ with a tail-biting bitshift trellis (1MAD/3INST/HYB)"

    def quantize_stack(self, weights, hessian, cfg: QTIPConfig) -> list[QuantizedTensor]:
        """Linears sharing an input share V and H̃; their rows are stacked for one LDLQ run
        (rows are independent given H̃, so this is exact), each with its own U and scale."""
        for w in weights:
            _check_shape(tuple(w.shape), cfg)
        n = weights[0].shape[1]
        h, _ = prepare_hessian(hessian, weights[0])
        dead = torch.diagonal(hessian.xtx) == 0
        rhts = [RHT.make(w.shape[0], n, cfg.seed) for w in weights]
        h_t = rhts[0].hessian(h)
        lut = hyb_lut(cfg.hyb_q, cfg.seed) if cfg.code == "hyb" else None
        table = _table(cfg.code, cfg.L, cfg.seed, lut)
        xs, scales = [], []
        for w, rht in zip(weights, rhts):
            w = w.detach().float().clone()
            w[:, dead] = 0.0
            wt = rht.weight(w)
            with one_thread():  # a full reduction: thread-count-dependent bits (utils/threads.py)
                s = (wt.square().mean().sqrt() / cfg.scale_alpha).clamp_min(1e-8).half()
            xs.append(wt / s.float())
            scales.append(s)
        x = torch.cat(xs)
        tr, tx, g = cfg.trellis, cfg.tile_rows, cfg.tile_cols
        upper = cholesky_factor(h_t, cfg.damp)

        def quantize_block(col: int, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = block.shape[0]
            seqs = block.reshape(rows // tx, tx * g)  # tile-major: rows t·tx..(t+1)·tx−1
            states, rec = quantize_sequences(
                seqs, table, tr, max_bytes=cfg.max_mib << 20, warmup=cfg.tb_warmup
            )
            return rec.reshape(rows, g), tr.chunks(states).reshape(rows, g // tr.V)

        res = ldlq(x, h_t, g, quantize_block, damp=cfg.damp, upper=upper)
        out, r0 = [], 0
        for w, rht, s in zip(weights, rhts, scales):
            m = w.shape[0]
            out.append(_encode(self.name, res.codes[r0 : r0 + m], rht, s, cfg, lut))
            r0 += m
        return out

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return stored_rht(qt).unweight(decode_rows(qt))

    def make_linear(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache_weight: bool = True):
        return QTIPLinear(qt, bias, cache_weight=cache_weight)


def _row_chunks(qt: QuantizedTensor, tr: Trellis, r0: int, r1: int) -> torch.Tensor:
    """The trellis chunks of rows r0:r1, unpacking only their bytes when rows are byte-aligned."""
    m, n = qt.shape
    per_row = n // tr.V
    codes = qt.tensors["codes"]
    if (per_row * tr.kv) % 8 == 0:
        b = per_row * tr.kv // 8
        return unpack_bits(codes[r0 * b : r1 * b], tr.kv, (r1 - r0) * per_row)
    return unpack_bits(codes, tr.kv, m * per_row)[r0 * per_row : r1 * per_row]


def decode_rows(qt: QuantizedTensor, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0:r1 (multiples of ``tile_rows``) of W̃·s, the quantized weight in the Hadamard
    basis: rebuild each tile's states by shifting, look the values up, rescale."""
    m, n = qt.shape
    r1 = m if r1 is None else r1
    meta = qt.meta
    tr = Trellis(meta["L"], meta["bits"], meta["V"])
    tx, g = meta["tile_rows"], meta["tile_cols"]
    rows = r1 - r0
    table = _table(meta["code"], tr.L, meta["seed"], qt.tensors.get("lut")).to(qt.tensors["codes"].device)
    chunks = _row_chunks(qt, tr, r0, r1).view(rows, n // g, g // tr.V)
    # (rows, blocks, g/V) → one sequence per (block, tile): (blocks, rows/tx, tx·g/V)
    seq = chunks.permute(1, 0, 2).reshape(n // g, rows // tx, tx * g // tr.V)
    vals = decode(tr.states(seq), table, tr)  # (blocks, rows/tx, tx·g)
    xt = vals.view(n // g, rows, g).permute(1, 0, 2).reshape(rows, n)
    return xt * qt.tensors["scale"].float()


class QTIPLinear(RHTLinear):
    """QTIP layer: rows of W̃ decoded from the trellis, one tile row-band at a time."""

    def decode_rows(self, r0: int, r1: int) -> torch.Tensor:
        return decode_rows(self.qtensor, r0, r1)

    def row_step(self) -> int:
        return int(self.qtensor.meta["tile_rows"])


def _check_shape(shape: tuple[int, int], cfg: QTIPConfig) -> None:
    m, n = shape
    if m % cfg.tile_rows or n % cfg.tile_cols or cfg.tile_cols % cfg.trellis.V:
        raise ShapeError(
            f"qtip: a {m}×{n} weight cannot be cut into {cfg.tile_rows}×{cfg.tile_cols} trellis tiles; "
            "choose tile_rows/tile_cols that divide its shape"
        )
    cfg.trellis.steps(cfg.tile_rows * cfg.tile_cols)
    factor(m), factor(n)  # unsupported Hadamard sizes fail here with the nearest supported ones


def _encode(
    method: str,
    chunks: torch.Tensor,
    rht: RHT,
    scale: torch.Tensor,
    cfg: QTIPConfig,
    lut: torch.Tensor | None,
) -> QuantizedTensor:
    m, n = rht.shape
    tr = cfg.trellis
    tensors = {
        "codes": pack_bits(chunks, tr.kv),
        "scale": scale.reshape(1),
        "s_out": pack_signs(rht.s_out),
        "s_in": pack_signs(rht.s_in),
    }
    bit_counts = {"codes": m * n * cfg.bits, "scale": 16, "signs": m + n}
    if lut is not None:
        tensors["lut"] = lut.half()
        bit_counts["lut"] = lut.numel() * 16
    meta = {
        "L": cfg.L,
        "bits": cfg.bits,
        "V": tr.V,
        "code": cfg.code,
        "tile_rows": cfg.tile_rows,
        "tile_cols": cfg.tile_cols,
        "seed": cfg.seed,
    }
    return QuantizedTensor(method, (m, n), tensors, meta, bit_counts)
