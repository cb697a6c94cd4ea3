"""Continuous relaxation of a quantized linear whose weight factors as

    W = scale · diag(a) · M · diag(b)

with M fixed by the stored codes (QuIP#: Hᵀ C H; QTIP: Hᵀ T H) and a, b the sign vectors of
the randomized Hadamard transform.  Training keeps M and learns row gains ``ga``, column gains
``gb`` (the signs relaxed to continuous values, as QuIP# does) and a scale multiplier ``t``.
Writing back is exact in the stored format: the gains go to two fp16 vectors ``g_out``,
``g_in`` (``a = signs_out · g_out``; counted in ``bit_counts["gains"]``) and the scale keeps its
own stored dtype (float32 for QuIP#, fp16 for QTIP), so the reloaded model is the tuned one.

Any method whose :class:`~q2lab.quant.base.QuantizedTensor` stores ``s_out``, ``s_in`` (packed
signs) and ``scale``, and decodes through :func:`q2lab.quant.rht_linear.stored_rht`, can be
fine-tuned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from q2lab.quant.base import get_quantizer
from q2lab.quant.linear import QuantLinear

GAIN_DTYPE = torch.float16


def tunable(mod: nn.Module) -> bool:
    """Whether a module is a quantized linear this relaxation can tune."""
    return isinstance(mod, QuantLinear) and {"s_out", "s_in", "scale"} <= set(mod._names)


class TunableLinear(nn.Module):
    """Training stand-in for a :class:`QuantLinear`: ``y = ((x·gb) W₀ᵀ)·ga·t + bias`` with W₀
    the decoded weight (no m × n weight or gradient is built per step)."""

    def __init__(self, ql: QuantLinear, gains: bool) -> None:
        super().__init__()
        self.qt = ql.qtensor
        self.cache_weight = ql.cache_weight
        self.register_buffer("w0", self.qt.dequantize(torch.float32))
        self.bias = ql.bias
        m, n = self.qt.shape
        self.t = nn.Parameter(torch.ones(()))
        self.ga = nn.Parameter(torch.ones(m), requires_grad=gains)
        self.gb = nn.Parameter(torch.ones(n), requires_grad=gains)
        self.gains = gains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.float() * self.gb, self.w0) * (self.ga * self.t)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def harden(self) -> QuantLinear:
        """The quantized layer in its stored format with the tuned values (rounded to it)."""
        qt = self.qt
        m, n = qt.shape
        t = dict(qt.tensors)
        scale = t["scale"]
        t["scale"] = (scale.float() * self.t).to(scale.dtype)
        bit_counts = dict(qt.bit_counts)
        if self.gains:
            dev = scale.device
            g_out = t["g_out"].float() if "g_out" in t else torch.ones(m, device=dev)
            g_in = t["g_in"].float() if "g_in" in t else torch.ones(n, device=dev)
            t["g_out"] = (g_out * self.ga).to(GAIN_DTYPE)
            t["g_in"] = (g_in * self.gb).to(GAIN_DTYPE)
            bit_counts["gains"] = 16 * (m + n)
        new = dataclasses.replace(qt, tensors=t, bit_counts=bit_counts)
        return get_quantizer(qt.method).make_linear(new, self.bias, cache_weight=self.cache_weight)


@contextmanager
def relaxed(root: nn.Module, gains: bool) -> Iterator[list[nn.Parameter]]:
    """Within the block: every tunable quantized linear under ``root`` is a
    :class:`TunableLinear` (RHT methods) or a :class:`~q2lab.finetune.pv.PVLinear` (codebook
    methods: books and scales trainable, codes fixed) and the norm weights are trainable; every
    other parameter (embeddings, lm_head, biases) is frozen, so backward passes compute only what is tuned.
    Yields the trainable parameters; on exit the linears are written back in their stored
    format and every parameter's ``requires_grad`` is restored."""
    flags = [(p, p.requires_grad) for p in root.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    from q2lab.finetune.pv import PVLinear, pv_tunable  # pv builds on this module

    params: list[nn.Parameter] = []
    for name, mod in list(root.named_modules()):
        if tunable(mod):
            tl = TunableLinear(mod, gains)
            root.set_submodule(name, tl)
            params += [p for p in (tl.t, tl.ga, tl.gb) if p.requires_grad]
        elif pv_tunable(mod):
            pl = PVLinear(mod)
            root.set_submodule(name, pl)
            params += list(pl.tuned.values())
    for mod in root.modules():
        if _is_norm(mod):
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)
                params.append(p)
    try:
        yield params
    finally:
        for name, mod in list(root.named_modules()):
            if isinstance(mod, (TunableLinear, PVLinear)):
                root.set_submodule(name, mod.harden())
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)


def _is_norm(mod: nn.Module) -> bool:
    """RMSNorm/LayerNorm-like modules (by class name: every HF architecture spells it *Norm)."""
    return "norm" in type(mod).__name__.lower() and any(True for _ in mod.parameters(recurse=False))


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def restore(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
