"""Vector-codebook methods' rate–distortion on an i.i.d. Gaussian weight matrix (issue 15).

Quantizes one N(0, 1) matrix with an identity Hessian (so the proxy loss is the MSE and error
feedback is moot) with VPTQ and AQLM presets and, as the peer measured in the same run,
QuIP#'s E8P12 (2 bits, a fixed lattice book: ≈ 0.091).  Prints per method the MSE, the code
bits per weight, the total bpw with the per-layer codebooks and the time, next to the closed-
form references (Lloyd–Max scalar 2-bit 0.1175, Shannon's D(2) = 0.0625).

The MSE is measured on the matrix the books were fit to, as the methods use them, and — the
column "held-out" — on a second, independent N(0, 1) matrix encoded with the same books (and
AQLM's row scales): the codes re-chosen by the PV V step's re-encoding (`q2lab.quant.vq.v_step`
with every vector allowed; nearest codeword for one book, 3 passes of coordinate descent over
AQLM's two).  Per-layer books are storage: a 2^16 × 8 fp16 book is 8.4 Mbit, +2 bpw on a
2048 × 2048 matrix, and with 8 vectors per entry it partly memorises the matrix (its fitted MSE
can fall below Shannon's 2-bit bound because the book carries the rest of the bits); the
held-out column is what the book's 2 index bits buy.

``python benchmarks/codebook_rate_distortion.py [--rows 2048] [--cols 2048] [--only vptq-v8-k65536]``
"""

from __future__ import annotations

import argparse
import time

import torch

from q2lab.calib.hessian import Hessian
from q2lab.quant.base import get_quantizer, make_config
from q2lab.quant.vq import v_step

PRESETS: dict[str, tuple[str, dict]] = {
    "quip#-e8p12": ("quip#", {"bits": 2, "scale_grid": 9}),
    "vptq-v4-k256": ("vptq", {"bits": 2, "vector_len": 4, "tune_steps": 0}),
    "vptq-v8-k65536": ("vptq", {"bits": 2, "vector_len": 8, "tune_steps": 0, "kmeans_iters": 10}),
    "aqlm-2x8": ("aqlm", {"bits": 2, "codebooks": 2, "codebook_bits": 8, "rounds": 2, "tune_steps": 20}),
    "aqlm-1x16": (
        "aqlm",
        {
            "bits": 2,
            "codebooks": 1,
            "codebook_bits": 16,
            "beam": 1,
            "rounds": 1,
            "tune_steps": 0,
            "kmeans_iters": 10,
        },
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument(
        "--only", nargs="*", default=None, help=f"presets to run (default all): {', '.join(PRESETS)}"
    )
    args = ap.parse_args()
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    hess = Hessian(torch.eye(args.cols, dtype=torch.float64), 1)
    print(
        f"N(0,1) matrix {args.rows} × {args.cols}, identity Hessian, torch threads {torch.get_num_threads()}"
    )
    print("references: Lloyd–Max scalar 2-bit 0.1175, Shannon D(2 bits) 0.0625")
    fresh = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(1))
    print(f"{'preset':16} {'MSE':>8} {'held-out':>9} {'code bpw':>9} {'bpw':>8} {'seconds':>8}")
    for name in args.only or list(PRESETS):
        method, opts = PRESETS[name]
        t0 = time.perf_counter()
        qt = get_quantizer(method).quantize(w, hess, make_config(method, opts))
        dt = time.perf_counter() - t0
        mse = float((w - qt.dequantize()).square().mean())
        code = sum(v for k, v in qt.bit_counts.items() if k.startswith("codes")) / qt.numel()
        held = _held_out(get_quantizer(method).pv_view(qt), fresh)
        held_s = "-" if held is None else f"{held:9.5f}"
        print(f"{name:16} {mse:8.5f} {held_s:>9} {code:9.3f} {qt.bpw():8.4f} {dt:8.1f}", flush=True)


def _held_out(view, fresh: torch.Tensor) -> float | None:
    """MSE of ``fresh`` encoded with the fitted books (None: a method without a PV view)."""
    if view is None:
        return None
    for _ in range(3):
        if v_step(view, fresh, 1.0) == 0:
            break
    return float((fresh - view.weight()).square().mean())


if __name__ == "__main__":
    main()
