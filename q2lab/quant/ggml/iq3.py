"""IQ3_S: 4-weight groups on a 512-point lattice of levels 0‥7, 8 sign bits, 4-bit scale per 32.

The search is ``quantize_row_iq3_s_impl`` from ``ggml-quants.c`` and shares every piece of the
IQ2 search (:class:`q2lab.quant.ggml.iq2._IQ2`: candidate scales, rounding, snapping to the
grid through the neighbour lists, refit); only the knobs differ: 19 candidates
``(15 + 0.2·k)/max``, weights ``x²`` without an importance matrix, and a final re-round of all
groups of a sub-block when any of them was off the grid.  The grid is gguf's published
``IQ3_S`` table.  3.4375 bpw.
"""

from __future__ import annotations

import gguf.quants as gq
import numpy as np

from q2lab.quant.ggml.fp import F32
from q2lab.quant.ggml.iq2 import _IQ2, codebook
from q2lab.quant.ggml.kquants import sigma2, sub_weights
from q2lab.quant.ggml.types import QK_K, fp16_bytes, half, position_major, split

_SUBS = QK_K // 32  # sub-blocks per super-block


class IQ3_S(_IQ2):
    name = "IQ3_S"
    layout = (("d", 2), ("qs", 64), ("qh", 8), ("signs", 32), ("scales", 4))
    summary = "4-weight groups on a 512-point lattice + 8 sign bits, 4-bit scale per 32 (3.4375 bpw)"
    sub, parity, doubled_sigma = 32, False, True
    eps = float(np.finfo(np.float32).smallest_subnormal)  # C skips a sub-block only when max == 0
    center, step, ongrid_start = 15, 0.2, False
    requires_imatrix = False

    @classmethod
    def _weights(cls, x, qw):
        if qw is None:
            return position_major(x * x, cls.sub)
        return sub_weights(x, qw, sigma2(x, doubled=True), cls.sub)

    @classmethod
    def _refine_groups(cls, ongrid, scale):
        return np.broadcast_to((~ongrid).any(axis=0) & (scale > 0), ongrid.shape)

    @classmethod
    def _pack(cls, x, idx, signs, d, codes, max_scale):
        dead = (position_major(np.abs(x), cls.sub).max(axis=0) == 0).reshape(-1, _SUBS)
        idx = idx.T.reshape(-1, _SUBS, 8)  # (S, sub-block, group)
        signs = signs.T.reshape(-1, _SUBS, 4)
        qh = ((idx >> 8) << np.arange(8)).sum(axis=-1)
        # C's all-zero sub-block `continue`s before advancing its qs/signs pointers: the later
        # sub-blocks' groups and signs move up one slot and the tail stays zero
        order = np.argsort(dead, axis=1, kind="stable")
        kept = ~np.take_along_axis(dead, order, axis=1)[..., None]
        qs = np.where(kept, np.take_along_axis(idx, order[..., None], axis=1), 0)
        sg = np.where(kept, np.take_along_axis(signs, order[..., None], axis=1), 0)
        c = codes.T.astype(np.uint8)
        return {
            "d": fp16_bytes(d * F32(1.033)),
            "qs": (qs & 255).reshape(-1, 64).astype(np.uint8),
            "qh": qh.astype(np.uint8),
            "signs": sg.reshape(-1, 32).astype(np.uint8),
            "scales": c[:, 0::2] | (c[:, 1::2] << 4),
        }

    @classmethod
    def dequantize_blocks(cls, blocks):
        p = split(blocks, cls.layout)
        n = blocks.shape[0]
        sc = p["scales"]
        codes = np.stack([sc & 0x0F, sc >> 4], axis=-1).reshape(n, _SUBS)
        hi = (p["qh"][..., None] >> np.arange(8, dtype=np.uint8)) & 1  # (n, sub-block, group)
        idx = p["qs"].reshape(n, _SUBS, 8).astype(np.int64) | (hi.astype(np.int64) << 8)
        grid = codebook(cls.name).levels[idx].astype(F32)  # (n, sub, group, 4)
        values = np.asarray(gq.IQ3_S.grid_map, dtype=F32)[grid.astype(np.int64)].reshape(n, _SUBS, 32)
        db = half(p["d"]).reshape(n, 1) * (F32(1) + F32(2) * codes.astype(F32))
        bits = (p["signs"].reshape(n, _SUBS, 4)[..., None] >> np.arange(8, dtype=np.uint8)) & 1
        sgn = np.where(bits.reshape(n, _SUBS, 32) == 0, F32(1), F32(-1))
        return (db[..., None] * values * sgn).reshape(n, QK_K)
