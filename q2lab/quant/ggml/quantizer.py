"""Each GGML type as a registered q2lab method (``q4_k``, ``iq2_xxs``, …).

The :class:`~q2lab.quant.base.QuantizedTensor` of a GGML method stores exactly the GGUF
tensor bytes (``blocks``: rows × row_bytes, uint8), so a GGUF export writes them unchanged and
bit counts are the block layout's.  The importance matrix is the diagonal of the shared
Hessian (``Hessian.importance()`` = mean x² per input channel, llama.cpp's imatrix entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import MethodConfig, QuantizedTensor, Quantizer, option, register
from q2lab.quant.ggml.types import GGMLType, ggml_type, type_names

# Nominal code bits of each type (what a study's "bits" column shows); bpw is exact anyway.
NOMINAL_BITS = {
    "Q2_K": 2,
    "IQ2_XXS": 2,
    "IQ2_XS": 2,
    "IQ2_S": 2,
    "Q3_K": 3,
    "IQ3_S": 3,
    "Q4_0": 4,
    "Q4_1": 4,
    "Q4_K": 4,
    "IQ4_NL": 4,
    "Q5_0": 5,
    "Q5_1": 5,
    "Q5_K": 5,
    "Q6_K": 6,
    "Q8_0": 8,
}


@dataclass
class GGMLConfig(MethodConfig):
    """Options of every GGML type.  ``bits`` is fixed by the type and only checked."""

    bits: int = option(4, "fixed by the type (checked, not chosen)")
    imatrix: bool = option(
        False, "use the calibration Hessian's diagonal as llama.cpp's importance matrix (IQ2: required)"
    )
    force: bool = option(
        False, "IQ2 only: quantize without an importance matrix (llama.cpp refuses: garbage)"
    )
    fallback: bool = option(
        False,
        "rows that are not a multiple of the block use llama.cpp's fallback type "
        "(Q2_K/Q3_K→Q4_0, Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, IQ2→IQ4_NL), as llama-quantize does",
    )

    TYPE: ClassVar[str] = ""

    def validate(self) -> None:
        super().validate()
        if self.TYPE and self.bits != NOMINAL_BITS[self.TYPE]:
            raise ConfigError(
                f"{self.TYPE.lower()} stores {NOMINAL_BITS[self.TYPE]}-bit codes; bits cannot be set "
                f"to {self.bits} (pick another type instead)"
            )


class GGMLQuantizer(Quantizer):
    """Base of the per-type methods; ``gtype`` is the :class:`GGMLType`."""

    gtype: ClassVar[type[GGMLType]]

    def check_inputs(self, weight: torch.Tensor, hessian) -> None:
        """As the base check, but a missing Hessian is judged by :meth:`importance` (``force``)."""
        if hessian is not None:
            super().check_inputs(weight, hessian)
        elif weight.ndim != 2 or not torch.is_floating_point(weight):
            raise ShapeError(
                f"{self.name}: expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}"
            )

    def uses_hessian(self, cfg: GGMLConfig) -> bool:
        return bool(cfg.imatrix) or (self.gtype.requires_imatrix and not cfg.force)

    def importance(self, weight: torch.Tensor, hessian, cfg: GGMLConfig) -> np.ndarray | None:
        """The per-column importance to quantize with, or ``None`` for the reference path."""
        if hessian is not None and self.uses_hessian(cfg):
            from q2lab.quant.ggml.imatrix import hessian_importance

            return hessian_importance(hessian)[0]
        if self.gtype.requires_imatrix:
            if not cfg.force:
                raise ConfigError(
                    f"{self.name} needs an importance matrix: llama.cpp refuses to quantize "
                    f"{self.gtype.name} without one because the result is garbage; calibrate "
                    "(q2lab calibrate / a study calibration section), pass --imatrix, or set force=true"
                )
            return None if self.gtype.name == "IQ2_S" else np.ones(weight.shape[1], dtype=np.float32)
        return None

    def target(self, cols: int, cfg: GGMLConfig) -> GGMLQuantizer:
        """This type, or llama.cpp's fallback type when rows of ``cols`` do not fit (if enabled)."""
        if self.gtype.can_hold(cols) or not cfg.fallback:
            self.gtype.check_row_length(cols)
            return self
        from q2lab.quant.ggml.recipes import FALLBACK

        fb = FALLBACK.get(self.gtype.name)
        if fb is None or not ggml_type(fb).can_hold(cols):
            self.gtype.check_row_length(cols)
        return method_for_type(fb)

    def quantize(self, weight, hessian, cfg: GGMLConfig) -> QuantizedTensor:
        self.check_inputs(weight, hessian)
        target = self.target(int(weight.shape[1]), cfg)
        qw = self.importance(weight, hessian, cfg)
        return target.from_float(weight, qw)

    def quantize_many(self, weights, hessian, cfg: GGMLConfig) -> list[QuantizedTensor]:
        """Rows are independent given the importance, so linears sharing an input go as one matrix."""
        for w in weights:
            self.check_inputs(w, hessian)
        target = self.target(int(weights[0].shape[1]), cfg)
        qw = self.importance(weights[0], hessian, cfg)
        stacked = target.from_float(torch.cat([w.float() for w in weights]), qw)
        blocks = stacked.tensors["blocks"].split([w.shape[0] for w in weights])
        has_im = qw is not None
        return [target.from_blocks(b.contiguous(), w.shape[1], has_im) for b, w in zip(blocks, weights)]

    def from_float(self, weight: torch.Tensor, qw: np.ndarray | None) -> QuantizedTensor:
        x = weight.detach().to(torch.float32).cpu().numpy()
        blocks = self.gtype.quantize_rows(x, qw)
        return self.from_blocks(torch.from_numpy(blocks), x.shape[1], qw is not None)

    def from_blocks(self, blocks: torch.Tensor, cols: int, imatrix: bool) -> QuantizedTensor:
        """Wrap existing GGUF bytes (rows × row_bytes) as a QuantizedTensor."""
        rows = int(blocks.shape[0])
        meta = {"format": "ggml", "ggml_type": self.gtype.name, "imatrix": imatrix}
        return QuantizedTensor(
            self.name, (rows, cols), {"blocks": blocks}, meta, self.gtype.bit_counts(rows, cols)
        )

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        cols = qt.shape[1]
        data = qt.tensors["blocks"].cpu().numpy()
        return torch.from_numpy(self.gtype.dequantize_rows(data, cols)).to(qt.tensors["blocks"].device)


def _make(type_name: str) -> type[GGMLQuantizer]:
    gtype = ggml_type(type_name)
    bits = NOMINAL_BITS[type_name]
    cfg_cls = dataclass(
        type(
            f"{type_name}Config",
            (GGMLConfig,),
            {
                "__annotations__": {"bits": int, "imatrix": bool},
                "bits": option(bits, "fixed by the type (checked, not chosen)"),
                "imatrix": option(
                    gtype.requires_imatrix,
                    "use the calibration Hessian's diagonal as llama.cpp's importance matrix"
                    + (" (required by llama.cpp)" if gtype.requires_imatrix else ""),
                ),
                "TYPE": type_name,
                "__module__": __name__,
            },
        )
    )
    attrs = {
        "name": type_name.lower(),
        "config_cls": cfg_cls,
        "gtype": gtype,
        "needs_hessian": gtype.requires_imatrix,
        "summary": f"llama.cpp {type_name}, bit-exact GGUF blocks: {gtype.summary}",
        "__module__": __name__,
    }
    return register()(type(f"GGML_{type_name}", (GGMLQuantizer,), attrs))


METHODS: dict[str, type[GGMLQuantizer]] = {name: _make(name) for name in type_names() if name in NOMINAL_BITS}


def method_for_type(type_name: str) -> GGMLQuantizer:
    """The registered method of a GGML type name (``Q4_K`` → the ``q4_k`` quantizer)."""
    cls = METHODS.get(type_name.upper())
    if cls is None:
        raise ConfigError(f"no q2lab method for GGML type {type_name!r}; known: {', '.join(sorted(METHODS))}")
    return cls()
