"""SpinQuant (Liu et al., 2024), weight-only: learn R1 and R2 on the Stiefel manifold, then GPTQ.

Why: QuaRot's random rotations make weights incoherent on average; SpinQuant observes that the
quantized network's loss varies a lot between random rotations and learns the rotation that
minimizes it.  Here:

1. **Start** from QuaRot's rotations (random Hadamard R1 on the residual stream, one R2 per
   block on the value/output heads).
2. **Learn** them with Cayley SGD (:func:`q2lab.transforms.rotate.cayley_step`, orthogonal at
   every step) to minimize the next-token cross-entropy of the network whose linears are
   round-to-nearest fake-quantized *in the rotated basis* (straight-through gradients,
   :func:`q2lab.quant.uniform.fake_quant`), on calibration windows drawn like the store's.
   The float parts (embeddings, norms, ``lm_head``) are invariant to the rotation, so nothing but
   the linears is rotated while learning: each linear's effective weight in the original basis
   is ``fq(W_rot)`` mapped back (e.g. ``fq(W·diag(γ)·R1)·R1ᵀ·diag(γ)⁺`` for a reader of a norm).
3. **Rotate** the float model once with the learned R1/R2 and round every linear with GPTQ on
   the Hessians derived from the shared store, as :mod:`q2lab.quant.quarot` does.

CPU cost: a step rotates every linear twice (forward and backward) and runs the model on one
window: ≈ 10 s per 512-token window on SmolLM2-135M with 2 cores (measure: the report notes the
seconds).  Activation and KV-cache quantization (SpinQuant's W4A4KV4) are not in scope.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.models.arch import find_decoder
from q2lab.quant import uniform
from q2lab.quant.base import option, register, require_ints
from q2lab.quant.quarot import (
    QuaRot,
    QuaRotConfig,
    fixed_channels,
    fixed_note,
    initial_rotations,
    rotated_store,
)
from q2lab.transforms import rotate
from q2lab.utils.progress import progress


@dataclass
class SpinQuantConfig(QuaRotConfig):
    steps: int = option(100, "Cayley SGD steps (one calibration window each)")
    lr: float = option(1.5, "Cayley SGD learning rate")
    momentum: float = option(0.0, "momentum of the Riemannian gradient (0 = plain Cayley SGD)")
    max_angle: float = option(0.02, "largest rotation angle (radians) of one step, whatever lr says")
    windows: int = option(16, "calibration windows the rotations learn on, drawn like the store's")
    ctx: int = option(0, "tokens per learning window (0 = the store's ctx)")
    learn_heads: bool = option(True, "learn R2 as well as R1 (needs rotate_heads)")

    def validate(self) -> None:
        super().validate()
        require_ints(self, ("steps", "ctx"), 0)
        require_ints(self, ("windows",), 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.max_angle, (int, float)) and 0 < self.max_angle < math.pi):
            raise ConfigError(f"max_angle must be in (0, π) radians, got {self.max_angle!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")


@dataclass
class _Linear:
    """One linear as the learning sees it: its original weight and how the rotation acts on it."""

    name: str  # parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    weight: torch.Tensor
    gamma: torch.Tensor | None  # scale of the norm it reads (fused while learning)
    r1_in: bool
    r1_out: bool
    r2_in: bool  # o_proj: per-head R2 on its input
    r2_out: bool  # v_proj: per-head R2 on its output (rows from ``r2_first`` on)
    block: int
    r2_first: int = 0  # first value row of a fused qkv_proj (Phi-3); 0 for v_proj


def _linears(model: nn.Module, plan: rotate.NormPlan) -> list[_Linear]:
    layout = find_decoder(model)
    out = []
    for b, block in enumerate(layout.layers):
        roles = plan.roles(block)
        gammas = {}
        for norm, readers in roles.readers:
            g = block.get_submodule(norm).weight.detach().float() + plan.offset
            gammas.update(dict.fromkeys(readers, g))
        writers = {name: post is None for name, post in roles.writers}
        first = rotate.value_heads(model, block, roles.value)[2]
        for name, lin in layout.block_linears(b).items():
            out.append(
                _Linear(
                    f"{layout.full_name(b, name)}.weight",
                    lin.weight.detach().float(),
                    gammas.get(name),
                    name in gammas,
                    writers.get(name, False),
                    name == roles.attn_writer,
                    name == roles.value,
                    b,
                    first if name == roles.value else 0,
                )
            )
    return out


def _blockdiag(r2: torch.Tensor, width: int, first: int = 0) -> torch.Tensor:
    """R2 once per head over ``width`` rows/columns, the first ``first`` left alone (identity)."""
    heads = [r2] * ((width - first) // r2.shape[0])
    return torch.block_diag(torch.eye(first, dtype=r2.dtype), *heads) if first else torch.block_diag(*heads)


def _effective(lin: _Linear, r1: torch.Tensor, r2: torch.Tensor | None, cfg: SpinQuantConfig) -> torch.Tensor:
    """The linear's weight in the original basis after quantizing it in the rotated one."""
    w = lin.weight
    if lin.gamma is not None:
        w = w * lin.gamma[None, :]
    if lin.r1_in:
        w = w @ r1
    if lin.r1_out:
        w = r1.T @ w
    b2 = None
    if r2 is not None and (lin.r2_in or lin.r2_out):
        b2 = _blockdiag(r2, w.shape[1]) if lin.r2_in else _blockdiag(r2, w.shape[0], lin.r2_first)
        w = w @ b2 if lin.r2_in else b2.T @ w
    w = uniform.fake_quant(w, cfg.bits, cfg.group_size, cfg.symmetric)
    if b2 is not None:
        w = w @ b2.T if lin.r2_in else b2 @ w
    if lin.r1_out:
        w = r1 @ w
    if lin.r1_in:
        w = w @ r1.T
    if lin.gamma is not None:
        w = w * torch.where(lin.gamma == 0, torch.zeros_like(lin.gamma), 1.0 / lin.gamma)[None, :]
    return w


def learn_rotations(
    model: nn.Module,
    r1: torch.Tensor,
    r2: torch.Tensor | None,
    windows: torch.Tensor,
    cfg: SpinQuantConfig,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None, dict[str, Any]]:
    """Cayley SGD on R1 (and one R2 per block) minimizing the fake-quantized model's next-token
    loss on ``windows``; returns the learned rotations (float64, orthogonal) and statistics.
    Channels ``fixed`` stay fixed: their rows and columns of R1's gradient are zeroed, so the
    Cayley generator is zero there and every step is the identity on them."""
    plan = rotate.plan_for(model)
    lins = _linears(model, plan)
    blocks = 1 + max(lin.block for lin in lins)
    r1 = r1.float().clone().requires_grad_(True)
    learn2 = r2 is not None and cfg.learn_heads
    r2s = [r2.float().clone().requires_grad_(learn2) for _ in range(blocks)] if r2 is not None else None
    params = [r1, *(r2s if learn2 and r2s else [])]
    moms = [torch.zeros_like(p) for p in params]
    losses: list[float] = []
    t0 = time.time()
    for p in model.parameters():
        p.requires_grad_(False)
    for step in progress(range(cfg.steps), "spinquant rotations", cfg.steps, unit="step"):
        ids = windows[step % len(windows)].unsqueeze(0)
        weights = {
            lin.name: _effective(lin, r1, None if r2s is None else r2s[lin.block], cfg) for lin in lins
        }
        out = torch.func.functional_call(model, weights, args=(ids,), kwargs={"labels": ids}, strict=False)
        for p in params:
            p.grad = None
        out.loss.backward()
        if fixed is not None and fixed.numel():
            r1.grad[fixed, :] = 0.0
            r1.grad[:, fixed] = 0.0
        losses.append(float(out.loss.detach()))
        with torch.no_grad():
            for p, m in zip(params, moms):
                p.copy_(rotate.cayley_step(p, p.grad, cfg.lr, m, cfg.momentum, cfg.max_angle))
    stats = {
        "steps": cfg.steps,
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(sum(losses[-8:]) / len(losses[-8:]), 4) if losses else None,
        "seconds": round(time.time() - t0, 1),
    }
    r1_out = rotate.nearest_orthogonal(r1.detach())
    r2_out = None if r2s is None else [rotate.nearest_orthogonal(r.detach()) for r in r2s]
    return r1_out, r2_out, stats


@register()
class SpinQuant(QuaRot):
    name = "spinquant"
    config_cls = SpinQuantConfig
    summary = "SpinQuant: rotations R1/R2 learned by Cayley SGD through a fake-quantized model, then GPTQ"

    def prepare_model(self, model, cfg: SpinQuantConfig, store, windows=None) -> tuple[Any, list[str]]:
        if cfg.steps and windows is None:
            raise ConfigError("spinquant learns its rotations on calibration windows: none were given")
        r1, r2 = initial_rotations(model, cfg)
        notes = fixed_note(model, cfg)
        r2s: torch.Tensor | list[torch.Tensor] | None = r2
        if cfg.steps:
            data = windows(cfg.windows, cfg.ctx or None)
            r1, r2s, stats = learn_rotations(model, r1, r2, data, cfg, fixed_channels(model, cfg))
            notes.append(
                f"SpinQuant: {stats['steps']} Cayley SGD steps on {len(data)} × {data.shape[1]} windows, "
                f"fake-quantized CE {stats['loss_first']} → {stats['loss_last']} (mean of the last 8), "
                f"{stats['seconds']} s"
            )
        done = rotate.rotate_model(model, r1, r2s)
        return rotated_store(store, done), notes + done.notes()
