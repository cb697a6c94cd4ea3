"""Hessians of a transformed model, derived from the shared store instead of recalibrating.

Why: a rotated model (QuaRot, SpinQuant, ButterflyQuant) is the same function as the float one,
and each of its linears reads a known linear map of the original input, ``x' = x·A``.  Then
``Σ x'ᵀx' = Aᵀ (Σ xᵀx) A``: the store's Hessians give every rotated linear's Hessian exactly,
so all methods keep sharing one calibration (the seed study's premise) and nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch

from q2lab.calib.hessian import Hessian
from q2lab.errors import ShapeError

# A linear's input map: ``(A, unseen)``.  ``A`` maps the original input to the new one, x' = x·A.
# ``unseen`` (k × in, or None) are directions of the new input whose second moment the store
# cannot hold: a norm channel with scale exactly 0 is invisible in the original input, but not in
# the rotated one (Gemma-3-270M has one such channel in most of its pre-FFN norms — the channel of
# its massive activations, which the norm exists to silence).  The new input is RMS-normalized,
# so each token's squared norm is ``in`` (up to the norm's ε): the unseen directions share what
# the seen channels leave of ``n·in``, equally, with no correlations.  (The mean of the seen
# channels would be ≈ 600× too small there, and GPTQ would leave the largest errors exactly
# where the largest activations are.)
InputMap = tuple[torch.Tensor, "torch.Tensor | None"]


class DerivedHessians:
    """A read-only view of a :class:`~q2lab.calib.store.HessianStore` whose ``hessian(name)``
    returns ``Aᵀ H A`` (plus the unseen directions' stand-in) for the linears in
    ``input_maps``; others pass through unchanged.

    Everything else (``linears``, ``key``, ``path``, ``describe`` ...) is the wrapped store's, so
    it plugs in wherever a store is read.  Derived matrices are cached per block, like the
    store's own reads."""

    def __init__(self, store: Any, input_maps: dict[str, InputMap]) -> None:
        self.store = store
        self.input_maps = input_maps
        self._cache: tuple[int, dict[str, Hessian]] = (-1, {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def hessian(self, linear: str) -> Hessian:
        h = self.store.hessian(linear)
        found = self.input_maps.get(linear)
        if found is None:
            return h
        block = int(self.store.linears[linear]["block"])
        if self._cache[0] != block:
            self._cache = (block, {})
        key = f"{self.store.linears[linear]['tensor']}|{id(found[0])}"
        if key not in self._cache[1]:
            self._cache[1][key] = derive(h, *found)
        return self._cache[1][key]

    def importance(self, linear: str) -> torch.Tensor:
        return self.hessian(linear).importance()


def derive(h: Hessian, a: torch.Tensor, unseen: torch.Tensor | None = None) -> Hessian:
    """``Aᵀ H A`` in float64, symmetrized (the rounding of two products is not), plus the second
    moment of the ``unseen`` directions that RMS normalization implies (see :data:`InputMap`; when
    the seen channels already account for nearly all of it, their mean instead)."""
    if a.shape[0] != h.dim:
        raise ShapeError(f"an input map of shape {tuple(a.shape)} does not fit a {h.dim}-wide Hessian")
    a = a.to(torch.float64)
    xtx = a.T @ h.xtx.to(torch.float64) @ a
    xtx = 0.5 * (xtx + xtx.T)
    if unseen is not None and len(unseen):
        u = unseen.to(torch.float64)
        rest = (h.n * xtx.shape[0] - torch.trace(xtx)) / u.shape[0]
        mean_seen = torch.trace(xtx) / max(xtx.shape[0] - u.shape[0], 1)
        fill = rest if float(rest) > float(mean_seen) * 1e-3 else mean_seen
        xtx = xtx + fill * (u.T @ u)
    return Hessian(xtx, h.n)
