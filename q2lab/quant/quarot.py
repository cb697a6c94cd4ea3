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
from q2lab.quant.base import option, register
from q2lab.quant.gptq import GPTQ, GPTQConfig
from q2lab.transforms import rotate

ROTATIONS = ("hadamard", "orthogonal")


@dataclass
class QuaRotConfig(GPTQConfig):
    seed: int = option(0, "seed of the random rotations R1 and R2")
    rotation: str = option(
        "hadamard", "R1/R2 kind: 'hadamard' (random signs × Hadamard) or 'orthogonal' (Haar)"
    )
    rotate_heads: bool = option(True, "also rotate each value/output head by R2 (head_dim × head_dim)")

    def validate(self) -> None:
        super().validate()
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


def make_rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    return rotate.random_hadamard(n, seed) if kind == "hadamard" else rotate.random_orthogonal(n, seed)


def head_dim_of(model: torch.nn.Module) -> int:
    config = model.config.get_text_config()
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def rotated_store(store: Any, done: rotate.Rotated) -> DerivedHessians:
    return DerivedHessians(store, done.input_maps)


def initial_rotations(model: torch.nn.Module, cfg: QuaRotConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """QuaRot's seeded R1 (d × d) and R2 (head_dim × head_dim, None without ``rotate_heads``);
    SpinQuant starts its learning from them."""
    d = model.get_input_embeddings().weight.shape[1]
    r1 = make_rotation(cfg.rotation, d, 2 * cfg.seed)
    r2 = make_rotation(cfg.rotation, head_dim_of(model), 2 * cfg.seed + 1) if cfg.rotate_heads else None
    return r1, r2


@register()
class QuaRot(GPTQ):
    name = "quarot"
    config_cls = QuaRotConfig
    summary = "QuaRot: random Hadamard rotations R1 (residual) + R2 (heads), norms fused, then GPTQ"

    def prepare_model(self, model, cfg: QuaRotConfig, store, windows=None) -> tuple[Any, list[str]]:
        r1, r2 = initial_rotations(model, cfg)
        done = rotate.rotate_model(model, r1, r2)
        d = r1.shape[0]
        notes = [f"QuaRot: {cfg.rotation} R1 ({d}×{d}){' and R2 per head' if r2 is not None else ''}"]
        return rotated_store(store, done), notes + done.notes()
