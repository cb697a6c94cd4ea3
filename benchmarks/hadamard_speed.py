"""Fast Walsh–Hadamard transform vs a dense matrix multiply, same inputs, same run.

For each size n (default 4096 = 2^12 and Mistral's 14336 = 28·512), transforms a batch of row
vectors with :func:`q2lab.transforms.hadamard.hadamard_transform` (O(n log n) per row: radix-16
Sylvester digits plus the base-order digit) and with ``x @ Hᵀ`` for the dense orthogonal matrix
built once outside the timing (O(n²) per row).  Prints the best-of-``--repeat`` seconds of
each, their ratio, and the largest difference between the two results (they must agree), plus
the orthogonality error of the fast transform (‖ H(H⁻¹x) − x ‖∞).

``python benchmarks/hadamard_speed.py [--sizes 4096 14336] [--rows 256] [--repeat 3]``.
"""

from __future__ import annotations

import argparse

import torch

from q2lab.transforms.hadamard import factor, hadamard_matrix, hadamard_transform
from q2lab.utils.timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 14336])
    ap.add_argument("--rows", type=int, default=256, help="row vectors transformed per call")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; rows per call: {args.rows}; float32 CPU")
    cols = ("n", "p·2^k", "fast s", "dense s", "dense/fast", "max |diff|", "orth err")
    print(" ".join(f"{c:>10}" for c in cols))
    for n in args.sizes:
        p, s = factor(n)
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n))
        dense_t = hadamard_matrix(n, dtype=torch.float32).T.contiguous()
        hadamard_transform(x[:2])  # build the small digit matrices outside the timing
        t_fast = best_of(lambda x=x: hadamard_transform(x), args.repeat)
        t_dense = best_of(lambda x=x, d=dense_t: x @ d, args.repeat)
        diff = float((hadamard_transform(x) - x @ dense_t).abs().max())
        orth = float((hadamard_transform(hadamard_transform(x), inverse=True) - x).abs().max())
        ratio = f"{t_dense / t_fast:.1f}x"
        vals = (n, f"{p}·{s}", f"{t_fast:.4f}", f"{t_dense:.4f}", ratio, f"{diff:.2e}", f"{orth:.1e}")
        print(" ".join(f"{v:>10}" for v in vals))


if __name__ == "__main__":
    main()
