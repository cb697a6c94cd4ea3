"""Round-to-nearest on a uniform grid: the data-free baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from q2lab.errors import ConfigError
from q2lab.quant import uniform
from q2lab.quant.base import MethodConfig, QuantizedTensor, Quantizer, option, register


@dataclass
class UniformConfig(MethodConfig):
    """Options shared by the methods that store a uniform integer grid (RTN, GPTQ)."""

    bits: int = option(4, "bits per weight code (1..8)")
    group_size: int | None = option(128, "weights per scale along a row; null = one group per row")
    symmetric: bool = option(False, "symmetric grid (signed fp16 scale, no zero point) vs asymmetric")
    clip: str = option("minmax", "range per group: 'minmax' or 'mse' (search shrink factors)")

    def validate(self) -> None:
        super().validate()
        if self.group_size == -1:
            self.group_size = None
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive integer or null, got {self.group_size!r}")
        if self.clip not in ("minmax", "mse"):
            raise ConfigError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")


@register()
class RTN(Quantizer):
    name = "rtn"
    config_cls = UniformConfig
    summary = "round-to-nearest on a per-group uniform grid (data-free baseline)"

    def quantize(self, weight, hessian, cfg: UniformConfig) -> QuantizedTensor:
        self.check_inputs(weight, hessian)
        layout = uniform.GroupLayout.make(weight.shape[1], cfg.group_size)
        codes, scales, zeros = uniform.quantize_groups(
            weight.float(),
            cfg.bits,
            layout,
            cfg.symmetric,
            cfg.clip,  # type: ignore[arg-type]
        )
        return uniform.encode(
            self.name, codes, scales, zeros, bits=cfg.bits, layout=layout, symmetric=cfg.symmetric
        )

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return uniform.decode(qt)
