"""Per-linear input statistics: H = XᵀX accumulated in float64, and the importance diagonal.

Every method that uses second-order information (GPTQ, LDLQ in QuIP#/QTIP, SpinQuant+GPTQ,
Hessian-weighted k-means in VPTQ/AQLM, llama.cpp's importance matrix) reads the same
:class:`Hessian`, so method differences are never calibration differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from q2lab.errors import ShapeError

_PRODUCT_ELEMENTS = 1 << 25  # elements of one band of XᵀX or of its mean (128–256 MiB)


@dataclass
class Hessian:
    """Sum of outer products of a layer's inputs, ``xtx = Σ_t x_t x_tᵀ`` over ``n`` tokens."""

    xtx: torch.Tensor  # (in_features, in_features), float64, symmetric PSD
    n: int

    @property
    def dim(self) -> int:
        return int(self.xtx.shape[0])

    def mean(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """E[x xᵀ] = XᵀX / n (the scale GPTQ's damping is relative to), always a new tensor the
        caller may change.  Computed in row bands: a float32 mean of a 14336-wide float64 sum
        would otherwise pass through a 1.6 GiB float64 temporary."""
        out = torch.empty(self.xtx.shape, dtype=dtype, device=self.xtx.device)
        n, step = max(self.n, 1), max(1, _PRODUCT_ELEMENTS // max(self.dim, 1))
        for r in range(0, self.dim, step):
            out[r : r + step] = self.xtx[r : r + step] / n
        return out

    def importance(self) -> torch.Tensor:
        """Per-input-channel mean of x², i.e. llama.cpp's importance matrix entry."""
        return torch.diagonal(self.xtx) / max(self.n, 1)


class HessianAccumulator:
    """Streams batches of layer inputs into a float64 XᵀX.

    Each batch's product is formed in float32 (fast BLAS) and added to a float64 running sum,
    so the sum over many windows does not lose precision while the per-batch cost stays low.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[1] != self.xtx.shape[0]:
            raise ShapeError(f"input of width {x.shape[1]} fed to a {self.xtx.shape[0]}-wide Hessian")
        x32 = x.to(torch.float32)
        d = x32.shape[1]
        step = max(1, _PRODUCT_ELEMENTS // d)
        if step >= d:  # add_ casts on the fly: no float64 copy of the product
            self.xtx.add_(x32.T @ x32)
        else:  # wide inputs (a 7B MLP's 14336): the float32 product by column bands, not whole
            for j in range(0, d, step):
                self.xtx[:, j : j + step].add_(x32.T @ x32[:, j : j + step])
        self.n += int(x.shape[0])

    def result(self) -> Hessian:
        return Hessian(self.xtx, self.n)
