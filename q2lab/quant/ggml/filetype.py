"""A llama.cpp *file type* (``Q4_K_M``, ``Q2_K``, ``IQ2_M``, …) as one q2lab method, ``llamacpp``.

What users download and run is a file type, not a type: ``llama-quantize`` bumps attention V,
``ffn_down`` and attention output to more bits in some layers and falls back to 32-blocks where
a row is not a multiple of 256.  This method applies exactly that per-tensor plan
(:func:`q2lab.quant.ggml.recipes.plan_file`, the same one ``q2lab export --type`` writes) to the
decoder linears in place, each with q2lab's bit-exact GGML type, so a study can put
"Q4_K_M as llama.cpp ships it" next to the pure types and next to 2-bit methods on one shared
calibration.  Embeddings and ``lm_head`` stay float as for every q2lab method (the file would
hold them in Q6_K/Q8_0); the report's ``formats`` field says which type holds which share of
the linear weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.quant.base import MethodConfig, QuantizedTensor, Quantizer, get_quantizer, option, register
from q2lab.quant.ggml.archs import model_plan
from q2lab.quant.ggml.quantizer import NOMINAL_BITS, method_for_type
from q2lab.quant.ggml.recipes import DEFAULT_TYPE
from q2lab.quant.ggml.types import ggml_type

_FLOAT_FILES = ("F32", "F16")


def _needs_imatrix(what: str) -> str:
    return (
        f"{what}, which needs an importance matrix (llama.cpp refuses it: the result is garbage); "
        "set imatrix: true (CLI: --opt imatrix=true)"
    )


@dataclass
class FileTypeConfig(MethodConfig):
    """``file_type`` picks the recipe; ``bits`` follows from it (the default type's code bits)."""

    file_type: str = option(
        "", "llama.cpp file type: " + ", ".join(k for k in DEFAULT_TYPE if k not in _FLOAT_FILES)
    )
    imatrix: bool = option(
        False, "use the calibration Hessians' diagonal as llama.cpp's importance matrix (IQ2 files: required)"
    )
    bits: int = option(0, "set from the file type's default type (checked, not chosen)")

    def validate(self) -> None:
        ft = str(self.file_type).upper()
        known = [k for k in DEFAULT_TYPE if k not in _FLOAT_FILES]
        if ft not in known:
            raise ConfigError(f"llamacpp needs file_type, one of {', '.join(known)}; got {self.file_type!r}")
        self.file_type = ft
        nominal = NOMINAL_BITS[DEFAULT_TYPE[ft]]
        if self.bits not in (0, nominal):
            raise ConfigError(f"file type {ft} has {nominal}-bit codes; bits cannot be set to {self.bits}")
        self.bits = nominal
        if ggml_type(DEFAULT_TYPE[ft]).requires_imatrix and not self.imatrix:
            raise ConfigError(_needs_imatrix(f"file type {ft} is mostly {DEFAULT_TYPE[ft]}"))
        super().validate()


@register()
class LlamaCppFileType(Quantizer):
    """Each decoder linear in the GGML type llama.cpp's recipe for ``file_type`` gives it."""

    name = "llamacpp"
    config_cls = FileTypeConfig
    summary = "a llama.cpp file type (Q2_K, Q4_K_M, IQ2_M, …): its per-tensor GGML types, bit-exact"

    def uses_hessian(self, cfg: FileTypeConfig) -> bool:
        return bool(cfg.imatrix)

    def layer_methods(
        self, model: nn.Module, cfg: FileTypeConfig
    ) -> dict[str, tuple[Quantizer, MethodConfig] | None]:
        _, types = model_plan(model, cfg.file_type, has_imatrix=cfg.imatrix)
        out: dict[str, tuple[Quantizer, MethodConfig] | None] = {}
        for module, type_name in types.items():
            if type_name in _FLOAT_FILES:
                out[module] = None  # no block type holds these rows: llama.cpp keeps them float too
                continue
            if ggml_type(type_name).requires_imatrix and not cfg.imatrix:
                raise ConfigError(_needs_imatrix(f"{cfg.file_type} puts {module} in {type_name}"))
            q = method_for_type(type_name)
            out[module] = (q, q.config_cls(imatrix=cfg.imatrix))
        return out

    def quantize(self, weight: torch.Tensor, hessian, cfg: FileTypeConfig) -> QuantizedTensor:
        """One tensor has no file type; the default type stands in (``quantize_model`` uses the
        per-tensor plan of :meth:`layer_methods`)."""
        q = method_for_type(DEFAULT_TYPE[cfg.file_type])
        return q.quantize(weight, hessian, q.config_cls(imatrix=cfg.imatrix, fallback=True))

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return get_quantizer(qt.method).dequantize(qt)
