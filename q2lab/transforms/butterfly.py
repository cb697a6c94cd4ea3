"""Learnable butterfly rotations (ButterflyQuant, Xu et al. 2025): orthogonal by construction.

Why: a Hadamard matrix is the best fixed rotation against worst-case outliers, but its ±1
entries cannot be learned.  A butterfly keeps the Hadamard's O(n log n) structure — log2(n)
stages, stage s pairing coordinates i and i + 2^s — and replaces each ±1 2 × 2 block by a Givens
rotation with its own angle: n/2 angles per stage, (n/2)·log2(n) in all, and every setting of
the angles is an orthogonal matrix, so no projection or Cayley map is needed while learning.  With
every angle at π/4 each block is ``[[1, −1], [1, 1]]/√2`` and the butterfly is a Hadamard
matrix up to signs: learning can start from QuaRot's rotation.

Sizes that are not a power of two, n = p·2^k with p the smallest Hadamard base order that
:func:`q2lab.transforms.hadamard.factor` finds (SmolLM2's 576 = 36·16, Gemma-3's 640 = 20·32): the
rotation is the Kronecker product ``P ⊗ B_{2^k}`` of a learnable p × p orthogonal
``P = (H_p/√p)·exp(S − Sᵀ)`` (starts at the Hadamard base matrix; p(p−1)/2 parameters, the
matrix exponential of a skew matrix is orthogonal) and a butterfly on the 2^k digit.  Orthogonal
for every parameter value, and O(n·(log 2^k + p)) to apply.

Convention: ``apply(x)`` maps row vectors, ``x ↦ x Bᵀ`` (the transformed vector ``B x``), so
``dense()`` is B.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from q2lab.errors import ShapeError
from q2lab.transforms.hadamard import base_matrix, factor


class Butterfly(nn.Module):
    """An orthogonal n × n butterfly with learnable Givens angles (``angles``: k × 2^k/2) and, for
    n = p·2^k with p > 1, a learnable p × p orthogonal factor (``skew``)."""

    def __init__(self, n: int, init: str = "hadamard") -> None:
        super().__init__()
        p, s = factor(n)  # one clear error for a size with no Hadamard base
        self.n, self.p, self.s = n, p, s
        self.stages = int(math.log2(s))
        value = math.pi / 4 if init == "hadamard" else 0.0
        if init not in ("hadamard", "identity"):
            raise ValueError(f"butterfly init must be 'hadamard' or 'identity', got {init!r}")
        self.angles = nn.Parameter(torch.full((self.stages, max(s // 2, 1)), value))
        base = base_matrix(p, torch.float64) / math.sqrt(p)
        self.register_buffer("base", base, persistent=True)
        self.skew = nn.Parameter(torch.zeros(p, p)) if p > 1 else None

    @classmethod
    def from_params(cls, n: int, angles: torch.Tensor, skew: torch.Tensor | None) -> Butterfly:
        """The butterfly a stored ``(angles, skew)`` pair stands for (as :meth:`params` gave them)."""
        b = cls(n)
        if tuple(angles.shape) != tuple(b.angles.shape) or (skew is None) != (b.skew is None):
            raise ShapeError(f"stored butterfly parameters do not fit size {n}")
        with torch.no_grad():
            b.angles.copy_(angles.float())
            if b.skew is not None and skew is not None:
                iu = torch.triu_indices(b.p, b.p, offset=1)
                if skew.numel() != iu.shape[1]:
                    raise ShapeError(f"stored butterfly parameters do not fit size {n}")
                b.skew.zero_()
                b.skew[iu[0], iu[1]] = skew.float().reshape(-1)
        return b

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What defines the matrix: the angles and, for n = p·2^k with p > 1, the strict upper
        triangle of the skew generator (the only entries :meth:`base_factor` reads), detached."""
        skew = None
        if self.skew is not None:
            iu = torch.triu_indices(self.p, self.p, offset=1)
            skew = self.skew.detach()[iu[0], iu[1]].clone()
        return self.angles.detach().clone(), skew

    def round_params_(self, dtype: torch.dtype = torch.float16) -> None:
        """Round the parameters to ``dtype`` values in place, so a matrix rebuilt from parameters
        stored in that dtype is bit-identical to this one."""
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(prm.to(dtype).float())

    @property
    def n_params(self) -> int:
        """Free parameters: the butterfly's angles and the p-factor's p(p−1)/2 rotation generators."""
        return self.stages * (self.s // 2) + self.p * (self.p - 1) // 2

    def base_factor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The p × p orthogonal factor ``(H_p/√p)·exp(S − Sᵀ)``."""
        if self.skew is None:
            return self.base.to(dtype)
        s = torch.triu(self.skew.to(dtype), diagonal=1)
        return self.base.to(dtype) @ torch.linalg.matrix_exp(s - s.T)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``B x`` for each row vector x (..., n), differentiable in ``angles``."""
        lead = x.shape[:-1]
        y = x.reshape(-1, self.p, self.s)
        for stage in range(self.stages):
            y = self._stage(y, stage)
        if self.p > 1:
            y = torch.einsum("ij,rjs->ris", self.base_factor(y.dtype), y)
        return y.reshape(*lead, self.n)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        """``Bᵀ x`` for each row vector x (the inverse of :meth:`apply`): the p-factor transposed and
        the stages in reverse order with their angles negated (the two act on different digits)."""
        lead = x.shape[:-1]
        y = x.reshape(-1, self.p, self.s)
        if self.p > 1:
            y = torch.einsum("ji,rjs->ris", self.base_factor(y.dtype), y)
        for stage in reversed(range(self.stages)):
            y = self._stage(y, stage, -1.0)
        return y.reshape(*lead, self.n)

    def _stage(self, y: torch.Tensor, stage: int, sign: float = 1.0) -> torch.Tensor:
        """Rotate each pair (i, i + 2^stage) of the 2^k digit by its angle (times ``sign``)."""
        half = 1 << stage
        rows, p, s = y.shape
        blocks = y.reshape(rows, p, s // (2 * half), 2, half)
        a, b = blocks[:, :, :, 0, :], blocks[:, :, :, 1, :]
        theta = sign * self.angles[stage].to(y.dtype).reshape(s // (2 * half), half)
        c, sn = torch.cos(theta), torch.sin(theta)
        out = torch.stack((c * a - sn * b, sn * a + c * b), dim=3)
        return out.reshape(rows, p, s)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """B as a dense n × n matrix (rows: B e_j for each basis vector, transposed)."""
        eye = torch.eye(self.n, dtype=dtype, device=self.angles.device)
        return self.apply(eye).T
