"""UPQ (Unified Progressive Quantization, arXiv 2506.09104): FP16 → INT4 → INT2.

Stage 1 quantizes the float model block-wise to INT4 with GPTQ on the shared Hessians.  Why
GPTQ and not block-output reconstruction: it reads only what the shared store already holds (one
calibration for every method), its INT4 error is already small (SmolLM2-135M, 4-bit g128: KLD
≈ 0.03), and stage 2 retrains every weight anyway, so a costlier stage 1 buys little.

Stage 2 takes the INT4 weights to INT2 on ParetoQ's stretched elastic grid (SEQ: levels ±½s,
±1½s per group, no zero level, :func:`q2lab.quant.uniform.fake_quant_seq`):

* with a ``qat:`` section, quantization-aware training distils the float model into the INT2
  model — latent weights initialised from the INT4 ones, group steps from an MSE fit, the
  generalized Jensen–Shannon divergence to the teacher's next-token distributions as the loss,
  on data the teacher writes itself (:mod:`q2lab.finetune.qat`, reached through
  ``quantize_model``'s tuner hook, since methods never import training code);
* without one, the INT4 weights are rounded to the SEQ grid directly (:meth:`UPQ.finish_model`):
  the "INT4 → INT2 without distillation" ablation.

Storage: 2-bit codes + one fp16 step per group (2 + 16/g bpw, 2.125 at g128); the grid is the
uniform format's symmetric layout with the half-integer zero point ``2^(b−1) − ½`` in ``meta``.
It has no integer zero point, so GPTQ-style checkpoints (integer zeros) and GGML types cannot hold it
exactly: a UPQ model is saved as a q2lab checkpoint (safetensors + JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.quant import uniform
from q2lab.quant.base import QuantizedTensor, option, register
from q2lab.quant.finetune_option import QATConfig
from q2lab.quant.gptq import GPTQ, GPTQConfig, gptq_quantize

STAGE = "upq_stage"  # meta key: 1 = the INT4 stage-1 tensor, 2 = the final SEQ tensor


@dataclass
class UPQConfig(GPTQConfig):
    bits: int = option(2, "bits of the final SEQ grid (levels ±½s, ±1½s, … per group)")
    group_size: int | None = option(128, "weights per SEQ step along a row (stage 2)")
    stage1_bits: int = option(4, "bits of the stage-1 GPTQ grid the INT2 weights start from")
    stage1_group_size: int | None = option(128, "group size of the stage-1 GPTQ grid")
    init: str = option(
        "mse", "SEQ steps to start from: 'mse' (error fit) or 'max' (the paper's Δ = max|w|, step Δ/2)"
    )
    qat: Mapping | None = option(
        None,
        "stage 2 by distillation-based QAT: {steps, lr, beta, data: self|text, sequences, ...}; "
        "null = round the INT4 weights to the INT2 grid directly",
    )

    BITS_RANGE = (1, 4)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.stage1_bits, int) or not self.bits < self.stage1_bits <= 8:
            raise ConfigError(
                f"stage1_bits must be an integer above bits ({self.bits}) and at most 8, "
                f"got {self.stage1_bits!r}"
            )
        if self.stage1_group_size == -1:
            self.stage1_group_size = None
        g = self.stage1_group_size
        if g is not None and (not isinstance(g, int) or g < 1):
            raise ConfigError(f"stage1_group_size must be a positive integer or null, got {g!r}")
        if self.init not in ("mse", "max"):
            raise ConfigError(f"init must be 'mse' or 'max', got {self.init!r}")
        QATConfig.parse(self.qat)

    def stage1(self) -> GPTQConfig:
        """The GPTQ options of stage 1."""
        return GPTQConfig(
            bits=self.stage1_bits,
            group_size=self.stage1_group_size,
            symmetric=self.symmetric,
            clip=self.clip,
            damp=self.damp,
            act_order=self.act_order,
            block_size=self.block_size,
        )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d.get("qat") is None:
            d.pop("qat", None)
        return d


def seq_init(w: torch.Tensor, cfg: UPQConfig, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2's starting SEQ steps (rows × groups) for the INT4 weight ``w``: the squared-error
    fit, weighted per column by ``importance`` (the Hessian diagonal) when given."""
    layout = uniform.GroupLayout.make(w.shape[1], cfg.group_size)
    if cfg.init == "max":  # UPQ's: Δ = max|w|, step Δ / 2^(b−1) (2 bits: levels ±¼Δ, ±¾Δ)
        amax = torch.stack([w[:, s:e].abs().amax(1) for s, e in layout.bounds()], 1)
        return uniform.fp16_round(amax / (1 << (cfg.bits - 1))).clamp_min(6e-8)
    return uniform.seq_fit(w, cfg.bits, layout, importance)


def seq_tensor(w: torch.Tensor, scales: torch.Tensor, cfg: UPQConfig) -> QuantizedTensor:
    """The final INT2 tensor: ``w`` rounded to the SEQ grid of ``scales`` (rounded to fp16 first,
    so what is decoded is exactly what training saw once its steps are stored)."""
    layout = uniform.GroupLayout.make(w.shape[1], cfg.group_size)
    return uniform.seq_encode(
        UPQ.name, w, uniform.fp16_round(scales.detach().float()), cfg.bits, layout, {STAGE: 2}
    )


def stage1_layers(model: nn.Module) -> dict[str, Any]:
    """UPQ layers still holding their stage-1 INT4 weight, by module name."""
    from q2lab.quant.linear import QuantLinear

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.method == UPQ.name and m.meta.get(STAGE) == 1
    }


@register()
class UPQ(GPTQ):
    name = "upq"
    config_cls = UPQConfig
    needs_hessian = True
    summary = "UPQ: GPTQ to INT4, then INT4 → INT2 (SEQ grid) by distillation-based QAT (qat:) or rounding"

    def quantize_stack(self, weights, hessian, cfg: UPQConfig) -> list[QuantizedTensor]:
        """Stage 1 (GPTQ to INT4); without ``qat`` also stage 2 by rounding: the INT4 weights go
        to the SEQ grid, each group's step fit to the Hessian-diagonal-weighted error.  With
        ``qat`` the INT4 tensors stay for the training to start from."""
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.float() for w in weights])
        s1 = cfg.stage1()
        stage1 = self.encode_stack(weights, gptq_quantize(stacked, hessian, s1), s1, extra_meta={STAGE: 1})
        if cfg.qat is not None:
            return stage1
        importance = hessian.importance().to(stacked.device)
        return [self._round(qt.dequantize(torch.float32), cfg, importance) for qt in stage1]

    def _round(
        self, w: torch.Tensor, cfg: UPQConfig, importance: torch.Tensor | None = None
    ) -> QuantizedTensor:
        return seq_tensor(w, seq_init(w, cfg, importance), cfg)

    def finish_model(self, model: nn.Module, cfg: UPQConfig) -> list[str]:
        """Any layer still at INT4 once training is over (none when the tuner ran) is rounded to
        the SEQ grid, so a UPQ model never leaves quantization half-way; notes say how stage 2 ran."""
        left = stage1_layers(model)
        for name, m in left.items():
            qt = self._round(m.qtensor.dequantize(torch.float32), cfg)
            model.set_submodule(name, self.make_linear(qt, m.bias, cache_weight=m.cache_weight))
        if cfg.qat is None:
            return [f"stage 2: INT{cfg.stage1_bits} → INT{cfg.bits} SEQ by rounding (no distillation)"]
        return [f"stage 2: INT{cfg.stage1_bits} → INT{cfg.bits} SEQ by distillation-based QAT"]

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return uniform.decode(qt)
