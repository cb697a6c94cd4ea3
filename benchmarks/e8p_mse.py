"""E8P12's rate–distortion on i.i.d. Gaussian data, against its references.

Prints the per-coordinate MSE at the best global scale (searched on a grid) of:

* ``e8p12``: q2lab's codebook with its exact fast search (2 bits per weight);
* ``ball-2^16``: the 2^16 points of E8 + ¼ nearest the origin, enumerated independently and
  searched by brute force (the paper's ≈ 0.0906 cross-check);
* the closed-form references: scalar Lloyd–Max at 2 bits (0.1175) and the Gaussian
  rate–distortion bound 2^-4 = 0.0625;

plus the fast search's throughput (vectors/s) and the brute force's, on the same vectors, as
a ratio.  ``python benchmarks/e8p_mse.py [--n 200000] [--brute-n 20000]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from q2lab.codebooks import e8p


def best(x: torch.Tensor, quantize, scales: list[float]) -> tuple[float, float]:
    res = [(float(((quantize(x * s) / s - x) ** 2).mean()), s) for s in scales]
    return min(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="Gaussian 8-vectors for the E8P12 MSE")
    ap.add_argument("--brute-n", type=int, default=20_000, help="vectors for the brute-force ball MSE")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 8, generator=g)
    scales = [round(0.96 + 0.01 * i, 2) for i in range(13)]
    mse, s = best(x, lambda v: e8p.quantize(v)[0], scales)
    print(f"e8p12      MSE {mse:.5f} at scale {s} on {args.n} vectors")
    xb = x[: args.brute_n]
    ball = e8p.e8_shifted_nearest().float()
    fine = [1.0, 1.02, 1.03, 1.04, 1.05, 1.06]
    mse_b, s_b = best(xb, lambda v: e8p.nearest_in(v, ball), fine)
    mse_e, _ = best(xb, lambda v: e8p.quantize(v)[0], fine)
    print(f"ball-2^16  MSE {mse_b:.5f} at scale {s_b} on {args.brute_n} vectors (e8p12 there: {mse_e:.5f})")
    print("lloyd-max  MSE 0.11750 (2-bit scalar, closed form);  R(D) bound 0.06250")
    t0 = time.perf_counter()
    e8p.quantize(xb)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    e8p.nearest_in(xb, e8p.codebook())
    t_brute = time.perf_counter() - t0
    print(
        f"search: fast {args.brute_n / t_fast:,.0f} vec/s, brute force over 2^16 points "
        f"{args.brute_n / t_brute:,.0f} vec/s, ratio {t_brute / t_fast:.1f}x"
    )


if __name__ == "__main__":
    main()
