"""QuaRot-style fixed rotations + GPTQ (Ashkboos et al., 2024), weight-only.

Why it exists: it is the baseline the learned rotations (SpinQuant, ButterflyQuant) must beat.
The float model is rotated once — norms fused, a random Hadamard R1 on the residual stream and
one R2 per attention head (:mod:`q2lab.transforms.rotate`) — which computes the same function
but spreads outlier channels, and then every linear is rounded by GPTQ against the Hessian
derived from the shared store (``Aᵀ H A``, :mod:`q2lab.calib.derived`), never recalibrated.

The stored model is an ordinary GPTQ model of the rotated float network: the rotation costs no
bits and, on pre-norm decoders, nothing at run time (Gemma 2/3's sandwich norms become dense d × d
float maps, see the transforms module).  QuaRot's online Hadamards R3/R4 serve activation and
KV-cache quantization and are not applied; down_proj is rounded in its own basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from q2lab.calib.derived import DerivedHessians
from q2lab.errors import ConfigError
from q2lab.models.arch import head_dim_of
from q2lab.quant.base import option, register
from q2lab.quant.gptq import GPTQ, GPTQConfig
from q2lab.transforms import rotate
from q2lab.transforms.hadamard import is_supported

ROTATIONS = ("hadamard", "orthogonal", "identity")


@dataclass
class QuaRotConfig(GPTQConfig):
    seed: int = option(0, "seed of the random rotations R1 and R2")
    rotation: str = option(
        "hadamard",
        "R1/R2 kind: 'hadamard' (random signs × Hadamard), 'orthogonal' (Haar) or 'identity' "
        "(norms fused, nothing rotated: an ablation)",
    )
    rotate_heads: bool = option(True, "also rotate each value/output head by R2 (head_dim × head_dim)")
    fix_zero_scale: bool = option(
        False,
        "keep residual channels that a pre-norm scales by 0 (massive-activation channels) out of R1",
        added_later=True,
    )

    def validate(self) -> None:
        super().validate()
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


def make_rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    """A seeded n × n rotation of ``kind``; ``identity`` is the ablation that fuses the norms into
    the linears (and derives their Hessians) but rotates nothing."""
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    return rotate.random_hadamard(n, seed) if kind == "hadamard" else rotate.random_orthogonal(n, seed)


def rotated_store(store: Any, done: rotate.Rotated) -> DerivedHessians:
    return DerivedHessians(store, done.input_maps)


def fixed_channels(model: torch.nn.Module, cfg: QuaRotConfig) -> torch.Tensor:
    """Residual channels R1 must leave alone (empty unless ``fix_zero_scale`` finds some)."""
    if not cfg.fix_zero_scale:
        return torch.zeros(0, dtype=torch.long)
    return rotate.zero_scale_channels(model)


def _r1_kind(cfg: QuaRotConfig, free: int, fixed: int) -> str:
    """R1's kind on the ``free`` channels: fixed channels leave an odd count (637 on Gemma-3-270M),
    Haar there; without any, an unsupported width stays the clear error make_rotation raises."""
    return "orthogonal" if fixed and cfg.rotation == "hadamard" and not is_supported(free) else cfg.rotation


def initial_rotations(model: torch.nn.Module, cfg: QuaRotConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """QuaRot's seeded R1 (d × d) and R2 (head_dim × head_dim, None without ``rotate_heads``);
    SpinQuant starts its learning from them.  Channels :func:`fixed_channels` names stay out of
    R1; the others get the rotation of their count (:func:`_r1_kind`)."""
    d = model.get_input_embeddings().weight.shape[1]
    fixed = fixed_channels(model, cfg)
    free = d - int(fixed.numel())
    r1 = make_rotation(_r1_kind(cfg, free, int(fixed.numel())), free, 2 * cfg.seed)
    if fixed.numel():
        r1 = rotate.fix_channels(r1, fixed, d)
    r2 = make_rotation(cfg.rotation, head_dim_of(model), 2 * cfg.seed + 1) if cfg.rotate_heads else None
    return r1, r2


def fixed_note(model: torch.nn.Module, cfg: QuaRotConfig) -> list[str]:
    fixed = fixed_channels(model, cfg)
    if not fixed.numel():
        return []
    free = int(model.get_input_embeddings().weight.shape[1] - fixed.numel())
    haar = _r1_kind(cfg, free, int(fixed.numel())) != cfg.rotation
    kind = " (Haar: no Hadamard of that size)" if haar else ""
    return [f"R1 leaves {fixed.numel()} zero-scale residual channel(s) {fixed.tolist()[:8]} unrotated{kind}"]


@register()
class QuaRot(GPTQ):
    name = "quarot"
    config_cls = QuaRotConfig
    summary = "QuaRot: random Hadamard rotations R1 (residual) + R2 (heads), norms fused, then GPTQ"

    def prepare_model(self, model, cfg: QuaRotConfig, store, windows=None) -> tuple[Any, list[str]]:
        r1, r2 = initial_rotations(model, cfg)
        d = r1.shape[0]
        notes = [f"QuaRot: {cfg.rotation} R1 ({d}×{d}){' and R2 per head' if r2 is not None else ''}"]
        notes += fixed_note(model, cfg)  # before the rotation resets the norms
        done = rotate.rotate_model(model, r1, r2)
        return rotated_store(store, done), notes + done.notes()
