"""Why Q5_K + imatrix looks almost lossless on SmolLM2 in the K-quant study.

The packaged SmolLM2 "float" reference is the dequantized shipped Q4_1 weights: every block of
32 holds at most 16 values ``m + d·q``.  Q5_1 (the type Q5_K falls back to on 576-wide rows) can
hold ``m + (d/2)·q'`` exactly, and the importance-matrix path of llama.cpp's Q5_1 searches the
scale while the plain path takes (max − min)/31.  So with an importance matrix Q5_1 nearly
re-finds the reference's own grid, an advantage Gaussian weights do not give it.

Run: ``PYTHONPATH=. python docs/results/kquant-study/q41_grid_check.py`` (a few seconds).
"""

from __future__ import annotations

import torch

from q2lab.calib.hessian import Hessian
from q2lab.quant.base import get_quantizer, make_config

ROWS, COLS, BLOCK = 64, 576, 32


def q41_grid_weights(gen: torch.Generator) -> torch.Tensor:
    """Weights that are exactly representable in Q4_1 (fp16 scale and min per block of 32)."""
    q = torch.randint(0, 16, (ROWS, COLS // BLOCK, BLOCK), generator=gen).float()
    d = (torch.rand(ROWS, COLS // BLOCK, 1, generator=gen) * 0.01 + 0.002).half().float()
    m = (-(torch.rand(ROWS, COLS // BLOCK, 1, generator=gen) * 0.05 + 0.01)).half().float()
    return (m + d * q).reshape(ROWS, COLS)


def rel_mse(method: str, weight: torch.Tensor, imatrix: bool) -> float:
    """Relative squared error of one GGML type, with a flat importance matrix or none."""
    quantizer = get_quantizer(method)
    hessian = Hessian(xtx=torch.eye(COLS, dtype=torch.float64), n=1) if imatrix else None
    qt = quantizer.quantize(weight, hessian, make_config(method, {"imatrix": imatrix}))
    return float((quantizer.dequantize(qt) - weight).pow(2).mean() / weight.pow(2).mean())


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = {"Q4_1 grid": q41_grid_weights(gen), "Gaussian": torch.randn(ROWS, COLS, generator=gen) * 0.02}
    print("| weights | type | rel. MSE plain | rel. MSE imatrix | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, w in weights.items():
        for method in ("q5_1", "q5_0", "q4_0"):
            plain, imat = rel_mse(method, w, False), rel_mse(method, w, True)
            print(f"| {name} | {method.upper()} | {plain:.2e} | {imat:.2e} | {plain / imat:.1f}× |")


if __name__ == "__main__":
    main()
