"""PV-tuning of codebook layers (AQLM, VPTQ): Malinovskii et al., "PV-Tuning: Beyond
Straight-Through Estimation for Extreme LLM Compression" (2024), on q2lab's two stages.

A codebook layer's weight is W(θ, c): continuous parameters θ (codebooks, row scales) and
discrete codes c.  The **P step** trains θ with c fixed — ordinary backpropagation, since the
decode is a gather (:class:`PVLinear`).  The **V step** moves codes: the gradient of the loss with
respect to W, summed over the P step's training windows, gives a target W̃ = W − η·ĝ (ĝ the
gradient scaled to W's RMS, η = ``finetune.v_lr`` × 1, 3 or 10, the one with the best held-out
loss); each vector's codes are re-chosen towards W̃ and only the ``finetune.v_frac`` of vectors
with the largest gain change (the paper's linearised V step with a bounded number of code
changes, :func:`q2lab.quant.vq.v_step`).  A V step is kept only when the held-out loss falls,
so tuning never makes it worse.

Which layers: any whose method opens a :meth:`~q2lab.quant.base.Quantizer.pv_view` (AQLM,
VPTQ).  QuIP# and QTIP layers are tuned by :mod:`.relax` (their codes index a fixed lattice /
trellis in the Hadamard domain, so in ``mode: pv`` they get the P step only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from q2lab.finetune.train import fit, held_out
from q2lab.quant.base import Quantizer, get_quantizer
from q2lab.quant.linear import QuantLinear
from q2lab.quant.vq import v_step


def pv_tunable(mod: nn.Module) -> bool:
    """Whether ``mod`` is a quantized linear whose method opens a PV view."""
    if not isinstance(mod, QuantLinear):
        return False
    return type(get_quantizer(mod.qtensor.method)).pv_view is not Quantizer.pv_view


class PVLinear(nn.Module):
    """Training stand-in for a codebook :class:`QuantLinear`: decodes W from trainable books
    (and scales) and fixed codes on every call; while ``tracking``, sums dL/dW for the V step."""

    def __init__(self, ql: QuantLinear) -> None:
        super().__init__()
        self.view = get_quantizer(ql.qtensor.method).pv_view(ql.qtensor)
        self.cache_weight = ql.cache_weight
        self.bias = ql.bias
        # each tensor is trained in units of its RMS, so one learning rate means the same relative
        # step for books of weights (RMS ≈ 0.02–0.1) as for the norms and gains (≈ 1)
        start = self.view.params
        self.unit = {k: float(v.square().mean().sqrt().clamp_min(1e-8)) for k, v in start.items()}
        self.tuned = nn.ParameterDict({k: nn.Parameter(v / self.unit[k]) for k, v in start.items()})
        self.tracking = False
        self.grad_sum: torch.Tensor | None = None

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: p * self.unit[k] for k, p in self.tuned.items()}

    def _sync(self) -> None:
        """Point the view at the current values (the V step and the write-back read them)."""
        self.view.params = {k: v.detach() for k, v in self._params().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.view.weight(self._params())
        if self.tracking and w.requires_grad:
            w.register_hook(self._accumulate)
        y = F.linear(x.float(), w).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _accumulate(self, g: torch.Tensor) -> None:
        self.grad_sum = g.detach().clone() if self.grad_sum is None else self.grad_sum + g.detach()

    @torch.no_grad()
    def v_step(self, fraction: float, lr: float) -> int:
        """Re-choose codes towards W − lr·ĝ; returns the vectors changed (0 without a gradient)."""
        if self.grad_sum is None:
            return 0
        self._sync()
        w = self.view.weight()
        g = self.grad_sum
        g_rms = g.square().mean().sqrt()
        if not bool(g_rms > 0):
            return 0
        target = w - lr * w.square().mean().sqrt() * g / g_rms
        return v_step(self.view, target, fraction)

    def codes(self) -> list[torch.Tensor]:
        return [c.clone() for c in self.view.codes()]

    def set_codes(self, codes: list[torch.Tensor]) -> None:
        for region, c in zip(self.view.regions, codes):
            region.codes.copy_(c)

    @torch.no_grad()
    def harden(self) -> QuantLinear:
        self._sync()
        qt = self.view.write()
        return get_quantizer(qt.method).make_linear(qt, self.bias, cache_weight=self.cache_weight)


def pv_fit(
    root: nn.Module,
    params: list[nn.Parameter],
    loss_of: Callable[[int], torch.Tensor],
    train_ids: list[int],
    valid_ids: list[int],
    epochs: int,
    lr: float,
    v_frac: float,
    v_lr: float,
    seed: int = 0,
    desc: str = "pv-tune",
) -> tuple[float, float, list[dict[str, float]]]:
    """Alternate one epoch of P (:func:`fit`, gradients of W summed) and one V step over every
    :class:`PVLinear` under ``root``, ``epochs`` times.  Returns the held-out loss before and
    after, and per round the P and V results (a V step that does not lower the held-out loss is
    undone)."""
    layers = [m for m in root.modules() if isinstance(m, PVLinear)]
    rounds: list[dict[str, float]] = []
    before = best = None
    for ep in range(epochs):
        for layer in layers:
            layer.tracking, layer.grad_sum = True, None
        b, p_loss = fit(
            params, loss_of, train_ids, valid_ids, 1, lr, seed=seed + ep, desc=f"{desc} P {ep + 1}"
        )
        for layer in layers:
            layer.tracking = False
        before = b if before is None else before
        v_loss, changed, step = _v_step(layers, loss_of, valid_ids, p_loss, v_frac, v_lr)
        rounds.append({"p_valid": p_loss, "v_valid": v_loss, "codes_changed": changed, "v_lr": step})
        best = v_loss
        if changed == 0 and p_loss >= b:  # neither step moved: converged
            break
    if before is None:
        before = best = held_out(loss_of, valid_ids)
    return before, best, rounds


# A V step's target moves each weight by v_lr·RMS(W) along the normalised gradient; at 2 bits the
# codewords are ~RMS(W) apart, so too short a step crosses no cell boundary and too long a one
# overshoots.  The step is searched over these multiples of v_lr on the held-out windows.
V_STEP_SCALES = (1.0, 3.0, 10.0)


def _v_step(
    layers: list[PVLinear],
    loss_of: Callable[[int], torch.Tensor],
    valid_ids: list[int],
    p_loss: float,
    v_frac: float,
    v_lr: float,
) -> tuple[float, int, float]:
    """Try the V step at each step length; keep the codes of the best held-out loss if it is
    below ``p_loss`` (else the codes stay).  Returns (held-out loss, vectors changed, v_lr used;
    0 when no step was kept)."""
    saved = [layer.codes() for layer in layers]
    best: tuple[float, int, float, list[list[torch.Tensor]]] = (p_loss, 0, 0.0, saved)
    for scale in V_STEP_SCALES:
        changed = sum(layer.v_step(v_frac, v_lr * scale) for layer in layers)
        if changed:
            v = held_out(loss_of, valid_ids)
            if v < best[0]:
                best = (v, changed, v_lr * scale, [layer.codes() for layer in layers])
        for layer, codes in zip(layers, saved):
            layer.set_codes(codes)
    for layer, codes in zip(layers, best[3]):
        layer.set_codes(codes)
        layer.grad_sum = None
    return best[0], best[1], best[2]
