"""Rate–distortion of QTIP's trellis codes on i.i.d. Gaussian data at k bits per weight.

For every L and code, quantizes S seeded N(0, 1) sequences of T weights with the tail-biting
bitshift trellis (two-pass Viterbi, exactly k bits per weight stored) and prints the
per-coordinate MSE at the best of a few global scales, next to two references computed in
the same run: the scalar Lloyd–Max quantizer at k bits (Lloyd's algorithm on the Gaussian
density; ≈ 0.1175 at 2 bits) and the rate–distortion bound 2^{−2k} (0.0625 at 2 bits).
E8P12 (QuIP#'s 8-D lattice codebook, 2 bits) is listed from its own benchmark when given.

    python benchmarks/qtip_rate_distortion.py                         # L = 8..16, 2 bits
    python benchmarks/qtip_rate_distortion.py --L 8 10 --seqs 32      # quick
    python benchmarks/qtip_rate_distortion.py --json out/qtip_rd.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from q2lab.quant.qtip.codes import CODES, code_dims, code_table
from q2lab.quant.qtip.trellis import Trellis
from q2lab.quant.qtip.viterbi import quantize_sequences


def lloyd_max_mse(bits: int, iters: int = 500) -> float:
    """MSE of the optimal scalar quantizer of N(0, 1) with 2^bits levels (Lloyd's algorithm)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    levels = torch.linspace(-1.5, 1.5, 1 << bits, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(iters):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        cdf = normal.cdf(edges)
        pdf = normal.log_prob(edges).exp()
        levels = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])  # conditional means
    edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
    cdf, pdf = normal.cdf(edges), normal.log_prob(edges).exp()
    # E[(x − c)²] over each cell: (second moment) − 2c(first moment) + c²(mass)
    e_left = torch.where(edges[:-1].isinf(), torch.zeros(1, dtype=torch.float64), edges[:-1] * pdf[:-1])
    e_right = torch.where(edges[1:].isinf(), torch.zeros(1, dtype=torch.float64), edges[1:] * pdf[1:])
    mass = cdf[1:] - cdf[:-1]
    m2 = mass + e_left - e_right
    m1 = pdf[:-1] - pdf[1:]
    return float((m2 - 2 * levels * m1 + levels**2 * mass).sum())


def trellis_mse(x: torch.Tensor, code: str, L: int, k: int, scales: list[float]) -> tuple[float, float]:
    """(best MSE, its scale) over global scales α: the code quantizes α·x."""
    tr = Trellis(L, k, code_dims(code))
    table = code_table(code, L)
    best = (math.inf, 0.0)
    for a in scales:
        states, rec = quantize_sequences(x * a, table, tr)
        assert bool(tr.is_tail_biting(states).all())
        best = min(best, (float(((rec / a - x) ** 2).mean()), a))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, nargs="+", default=[8, 10, 12, 14, 16])
    ap.add_argument("--codes", nargs="+", default=list(CODES), choices=CODES)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=128, help="sequences per cell")
    ap.add_argument("--length", type=int, default=256, help="weights per sequence (T)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.9, 0.95, 1.0])
    ap.add_argument("--e8p", type=float, default=None, help="E8P12 MSE from its own benchmark, to list")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.seqs, args.length, generator=torch.Generator().manual_seed(args.seed))
    bound, lm = 2.0 ** (-2 * args.bits), lloyd_max_mse(args.bits)
    rows = []
    for L in args.L:
        for code in args.codes:
            t0 = time.time()
            mse, a = trellis_mse(x, code, L, args.bits, args.scales)
            rows.append({"L": L, "code": code, "mse": mse, "scale": a, "seconds": time.time() - t0})
            print(f"L={L:2d} {code:6s} mse={mse:.4f} (scale {a}) {rows[-1]['seconds']:.1f}s", flush=True)
    print(f"\n{args.bits} bits, {args.seqs}×{args.length} N(0,1) weights, tail-biting, ", end="")
    print(f"best of scales {args.scales}")
    print("| L | " + " | ".join(args.codes) + " |")
    print("|---:|" + "---:|" * len(args.codes))
    for L in args.L:
        cells = [next(r for r in rows if r["L"] == L and r["code"] == c)["mse"] for c in args.codes]
        print(f"| {L} | " + " | ".join(f"{m:.4f}" for m in cells) + " |")
    print(f"scalar Lloyd–Max: {lm:.4f}   rate–distortion bound: {bound:.4f}", end="")
    print(f"   E8P12: {args.e8p:.4f}" if args.e8p is not None else "   E8P12: (pass --e8p)")
    if args.json:
        from q2lab.utils.io import atomic_path

        meta = {"machine": platform.platform(), "torch": torch.__version__, "args": vars(args)}
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"rows": rows, "lloyd_max": lm, "bound": bound, **meta}, f, indent=1)


if __name__ == "__main__":
    main()
