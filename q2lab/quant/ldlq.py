"""BlockLDLQ: Hessian error feedback for any quantizer of g consecutive columns at a time.

One implementation for QuIP# (g = 8, E8P lattice vectors), QTIP (trellis tiles) and any vector
quantizer; with g = 1 and a scalar grid it is GPTQ (tested against :mod:`q2lab.quant.gptq`).

The algorithm (QuIP#, Tseng et al. 2024, §4) in one screen.  Minimise the proxy loss
tr((Ŵ − W) H (Ŵ − W)ᵀ) by quantizing the columns of W in blocks of g, left to right, each after
adding a linear feedback of the rounding errors made so far.  Write H⁻¹ = Rᵀ R (R upper
triangular, the factor GPTQ uses) and let R_jj be the g×g diagonal block of block j.  Then
H = U D Uᵀ with U = R⁻¹·blockdiag(R)  (unit block upper triangular) and D = blockdiag(R_jj⁻¹R_jj⁻ᵀ)
— the block LDL decomposition — and the optimal feedback is, for every later column block k,

    W'_k ← W'_k − (η_j R_jj⁻¹) R_jk,     η_j = W'_j − Q(W'_j),

the block version of GPTQ's ``w −= (w_j − q_j)/R_jj · R_j,>j``.  As in GPTQ, updates inside a
super-block of columns are applied eagerly and the super-block's errors are pushed to the rest
of the matrix in one matmul ("lazy batch"), which is exact and runs at BLAS speed.

The quantizer is a callable ``quantize_block(col, block) -> (values, codes)``: ``block`` is the
error-fed (rows × g) slice starting at column ``col``; it returns the quantized values (same
shape) and any integer codes (rows × c), which are concatenated along columns in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from q2lab.errors import ShapeError
from q2lab.quant.gptq import inverse_cholesky_upper

QuantizeBlock = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LDLQResult:
    values: torch.Tensor  # (rows, n): the quantized matrix Q(W')
    codes: torch.Tensor  # (rows, Σ c): the callable's codes, block after block


def ldlq(
    weight: torch.Tensor,
    h: torch.Tensor,
    g: int | Sequence[int],
    quantize_block: QuantizeBlock,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    upper: torch.Tensor | None = None,
) -> LDLQResult:
    """Run BlockLDLQ on ``weight`` (rows × n) with input second moment ``h`` (n × n).

    ``h`` is damped by ``damp``·mean(diag) (raised tenfold until positive definite), like GPTQ;
    pass ``upper`` (the upper Cholesky factor R of the damped H⁻¹) to reuse one factorisation
    for several runs (e.g. a scale search).  ``block_size`` columns form one lazy-batch
    super-block; it is rounded down to a multiple of g.  ``g`` may also be a sequence of block
    widths summing to n (left to right), for quantizers whose blocks differ in width — VPTQ's
    outlier columns in shorter vectors before the main ones; super-blocks then hold whole blocks.
    """
    rows, n = weight.shape
    if tuple(h.shape) != (n, n):
        raise ShapeError(f"BlockLDLQ: a {tuple(h.shape)} Hessian does not fit {n} columns")
    supers = _super_blocks(n, g, block_size)
    u = upper if upper is not None else cholesky_factor(h, damp)
    u = u.to(device=weight.device, dtype=torch.float32)
    wt = weight.detach().float().T.contiguous()  # column j of W is row j here: contiguous
    values = torch.empty_like(wt)
    codes: list[torch.Tensor] = []
    for s0, s1, widths in supers:
        w1 = wt[s0:s1].clone()
        err1 = torch.empty_like(w1)
        j0 = 0
        for width in widths:
            j1 = j0 + width
            q, c = quantize_block(s0 + j0, w1[j0:j1].T)
            q = q.T
            r_jj = u[s0 + j0 : s0 + j1, s0 + j0 : s0 + j1]
            # E_jᵀ = R_jj⁻ᵀ ηᵀ  (for g = 1: η / R_jj, exactly GPTQ's arithmetic)
            e = torch.linalg.solve_triangular(r_jj.T, w1[j0:j1] - q, upper=False)
            if j1 < s1 - s0:
                w1[j1:] -= u[s0 + j0 : s0 + j1, s0 + j1 : s1].T @ e
            values[s0 + j0 : s0 + j1] = q
            err1[j0:j1] = e
            codes.append(c.reshape(rows, -1))
            j0 = j1
        if s1 < n:
            wt[s1:] -= u[s0:s1, s1:].T @ err1
    return LDLQResult(values.T.contiguous(), torch.cat(codes, dim=1))


def _super_blocks(n: int, g: int | Sequence[int], block_size: int) -> list[tuple[int, int, list[int]]]:
    """(start, end, block widths) of each lazy-batch super-block."""
    if isinstance(g, int):
        if g < 1 or n % g:
            raise ShapeError(f"BlockLDLQ: {n} columns cannot be split into blocks of {g}")
        step = max(g, block_size // g * g)
        return [(s0, min(s0 + step, n), [g] * ((min(s0 + step, n) - s0) // g)) for s0 in range(0, n, step)]
    widths = list(g)
    if not widths or min(widths) < 1 or sum(widths) != n:
        raise ShapeError(f"BlockLDLQ: block widths must be positive and sum to the {n} columns")
    supers, start, cur = [], 0, []
    for width in widths:
        cur.append(width)
        if sum(cur) >= block_size:
            supers.append((start, start + sum(cur), cur))
            start, cur = start + sum(cur), []
    if cur:
        supers.append((start, n, cur))
    return supers


def cholesky_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor R of (H + λI)⁻¹ in float32 (H is not modified)."""
    return inverse_cholesky_upper(h.detach().to(torch.float32).clone(), damp)


def proxy_loss(weight: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the output error on the calibration inputs that LDLQ minimises."""
    e = (weight - q).double()
    return float(((e @ h.double()) * e).sum())
