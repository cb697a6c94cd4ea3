"""Hugging Face AQLM export: a q2lab ``aqlm`` model as a checkpoint ``transformers`` loads with
the ``aqlm`` package (``AutoModelForCausalLM.from_pretrained(folder)``).

The format is the one ``transformers``' ``AqlmHfQuantizer`` reads: ``config.json`` carries
``quantization_config = {quant_method: "aqlm", in_group_size, out_group_size: 1,
num_codebooks, nbits_per_codebook, linear_weights_not_to_quantize}`` and every quantized
``<linear>`` has three tensors in place of its weight::

    <linear>.codes      (out, in / g, M)   int8 (B ≤ 8) or int16 (B ≤ 16), two's complement of
                                           the code (the reader takes it modulo 2^B)
    <linear>.codebooks  (M, 2^B, 1, g)     the model's float dtype
    <linear>.scales     (out, 1, 1, 1)     the model's float dtype

which is q2lab's own layout (codes row-major as (rows, groups, M), codebooks (M, K, g), one
scale per row) reshaped, so the export is lossless: codebooks and scales are fp16 in q2lab and
widen exactly to the model's dtype.  One ``quantization_config`` serves the whole model, so
every quantized linear must be ``aqlm`` with the same (M, B, g); float linears (``lm_head``
usually) are listed in ``linear_weights_not_to_quantize`` (as ``<linear>.weight``, which
transformers 4.x matches, and as ``<linear>``, which 5.x's module-name patterns match).
Anything else (another method, a mixed model, per-layer options that differ) is refused with
the offending layer named.

Written to a temporary folder and renamed, so a failure leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.export.hf_folder import float_dtype, float_state, write_hf_folder
from q2lab.models.loader import LoadedModel
from q2lab.quant.linear import QuantLinear
from q2lab.quant.vq import load_codes


def aqlm_layout(loaded: LoadedModel) -> tuple[dict[str, int], list[str]]:
    """The shared (M, B, g) of the model's aqlm linears and the float linears' weight names;
    a clear error when the model cannot be written as one HF AQLM checkpoint."""
    shape: dict[str, int] | None = None
    first = ""
    float_linears: list[str] = []
    for name, mod in loaded.model.named_modules():
        if isinstance(mod, QuantLinear):
            if mod.method != "aqlm":
                raise ConfigError(
                    f"hf-aqlm export: {name} is quantized with {mod.method!r}; every quantized linear "
                    "must be aqlm (export other methods as a q2lab checkpoint or GGUF)"
                )
            here = {k: int(mod.meta[k]) for k in ("codebooks", "codebook_bits", "group")}
            if shape is None:
                shape, first = here, name
            elif here != shape:
                raise ConfigError(
                    f"hf-aqlm export: {name} has codebooks×bits/group {_fmt(here)} but {first} has "
                    f"{_fmt(shape)}; the HF format holds one setting per model"
                )
        elif isinstance(mod, nn.Linear):
            # transformers 4.x matches weight paths, 5.x module-name patterns: list both
            float_linears += [f"{name}.weight", name]
    if shape is None:
        raise ConfigError("hf-aqlm export: the model has no aqlm-quantized linear (quantize with aqlm first)")
    return shape, float_linears


def _fmt(s: dict[str, int]) -> str:
    return f"{s['codebooks']}×{s['codebook_bits']}/g{s['group']}"


def hf_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits) as the ``aqlm`` package stores them: the smallest signed integer
    type holding ``bits``, values ≥ half its range wrapped to negative (read back modulo 2^bits)."""
    dtype, width = (torch.int8, 8) if bits <= 8 else (torch.int16, 16)
    c = codes.to(torch.int32)
    return torch.where(c >= 1 << (width - 1), c - (1 << width), c).to(dtype)


def _layer_tensors(name: str, mod: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rows, n = mod.out_features, mod.in_features
    m, b, g = (int(mod.meta[k]) for k in ("codebooks", "codebook_bits", "group"))
    qt = mod.qtensor
    codes = load_codes(qt.tensors["codes"], b, rows * (n // g) * m).view(rows, n // g, m)
    out = {
        f"{name}.codes": hf_codes(codes, b).contiguous(),
        f"{name}.codebooks": qt.tensors["codebooks"].to(dtype).reshape(m, 1 << b, 1, g).contiguous(),
        f"{name}.scales": qt.tensors["scales"].to(dtype).reshape(rows, 1, 1, 1).contiguous(),
    }
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.detach().to(dtype).contiguous()
    return out


def export_hf_aqlm(loaded: LoadedModel, out: str | Path) -> dict[str, Any]:
    """Write ``loaded`` (an aqlm-quantized model or checkpoint) to folder ``out``; returns a
    summary (quantization_config, tensor counts, bytes)."""
    shape, float_linears = aqlm_layout(loaded)
    model = loaded.model
    dtype = float_dtype(model)
    tensors: dict[str, torch.Tensor] = {}
    quantized = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            tensors.update(_layer_tensors(name, mod, dtype))
            quantized.append(name)
    tensors.update(float_state(model, quantized, dtype))
    qconfig = {
        "quant_method": "aqlm",
        "in_group_size": shape["group"],
        "out_group_size": 1,
        "num_codebooks": shape["codebooks"],
        "nbits_per_codebook": shape["codebook_bits"],
        "linear_weights_not_to_quantize": float_linears,
    }
    size = write_hf_folder(loaded, out, tensors, qconfig, quantized)
    return {
        "format": "hf-aqlm",
        "out": str(out),
        "quantization_config": qconfig,
        "quantized_linears": len(quantized),
        "float_linears": len(float_linears) // 2,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": size,
    }
