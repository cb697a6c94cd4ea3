"""compressed-tensors export: RTN / GPTQ results as the checkpoint format vLLM serves and
transformers loads (``quant_method: compressed-tensors``, ``format: pack-quantized``).

What the format holds for each quantized ``<linear>`` in place of its weight::

    <linear>.weight_packed      (out, ⌈in·b/32⌉) int32   codes + 2^(b−1), a dense little-endian bit
                                                          stream per row (first code in the lowest bits)
    <linear>.weight_scale       (out, in / g)    float   one scale per group (per row: g = in)
    <linear>.weight_zero_point  (⌈out·b/32⌉, in / g) int32  asymmetric grids only: zero points
                                                          + 2^(b−1), packed the same way down each column
    <linear>.weight_shape       (2,) int64       (out, in)

and dequantizes ``(q − z)·s`` with q, z signed in ``[−2^(b−1), 2^(b−1))``.  q2lab's uniform grid is
``(q − z)·s`` with q, z in ``[0, 2^b)`` (asymmetric) or z = 2^(b−1) (symmetric): the same numbers
shifted by 2^(b−1), so the export is lossless — scales are fp16 values written in the model's
float dtype, and transformers' decompressed weights equal q2lab's decoded weights bit for bit.

What it can express, and what it refuses with the layer named:

* ``rtn`` and ``gptq`` linears (and rotation methods' GPTQ linears when the rotation is folded
  into float weights — QuaRot/SpinQuant on norm-fusable architectures), 1–8 bits, symmetric or
  asymmetric, per-row or groups that divide the row (the format has no short last group: SmolLM2's
  576 columns take group sizes 64 or 192, not 128);
* GPTQ's act-order only where the groups do not depend on the order: per-row scales, or
  ``act_order: false``.  This version of the format has no per-column group index (``g_idx``);
  q2lab's act-order groups are contiguous in the permuted order, so they cannot be written;
* not: codebook and lattice methods (QuIP#, QTIP, AQLM, VPTQ), GGML block types, UPQ's SEQ grid
  (half-integer zero point), Gemma's rotated sandwich norms (``DenseNorm``), unfused MoE experts.

Several bit widths or group sizes in one model become several ``config_groups`` whose targets
are the linears' names; float linears (``lm_head`` usually) are listed in ``ignore``.  Written to a
temporary folder and renamed, so a failure leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from q2lab.errors import ConfigError
from q2lab.export.hf_folder import float_dtype, float_state, write_hf_folder
from q2lab.models.arch import UnfusedExperts
from q2lab.models.loader import LoadedModel
from q2lab.quant.linear import QuantLinear
from q2lab.quant.uniform import GroupLayout, original_order, stored_codes, stored_zeros
from q2lab.transforms.rotate import DenseNorm

FORMAT = "pack-quantized"
METHODS = ("rtn", "gptq", "quarot", "spinquant")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes`` (rows × n, values < 2^bits) as one dense little-endian bit stream per
    row in ⌈n·bits/32⌉ int32 words (the format's packing; code i starts at bit i·bits)."""
    rows, n = codes.shape
    words = -(-n * bits // 32)
    bit = torch.arange(bits, dtype=torch.int64)
    stream = (codes.to(torch.int64).unsqueeze(-1) >> bit) & 1  # rows × n × bits, LSB first
    stream = stream.reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits))
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)
    packed = (stream.view(rows, words, 32) * weights).sum(-1)  # 0 .. 2^32 − 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _scheme(mod: QuantLinear, name: str) -> dict[str, Any]:
    """The layer's weight quantization args, or a one-line error saying why it has none."""
    qt = mod.qtensor
    meta = qt.meta
    if qt.method not in METHODS or meta.get("format") != "uniform":
        raise ConfigError(
            f"compressed-tensors export: {name} is quantized with {qt.method!r}, which the format cannot "
            f"express (it holds uniform integer grids: {', '.join(METHODS)})"
        )
    bits, rows_cols = int(meta["bits"]), qt.shape
    if not 1 <= bits <= 8:
        raise ConfigError(f"compressed-tensors export: {name} has {bits}-bit codes; the format packs 1–8")
    cols = rows_cols[1]
    g = int(meta["group_size"])
    if g < cols and cols % g:
        raise ConfigError(
            f"compressed-tensors export: {name} has {cols} columns in groups of {g}; the format needs "
            "groups that divide the row (quantize with a group size dividing every linear's width)"
        )
    if "perm" in qt.tensors and g < cols:
        raise ConfigError(
            f"compressed-tensors export: {name} was quantized with act-order groups, which this format "
            "cannot express (no per-column group index); quantize with act_order: false or per-row scales"
        )
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": bool(meta["symmetric"]),
        "strategy": "group" if g < cols else "channel",
        "group_size": g if g < cols else None,
        "dynamic": False,
        "actorder": None,
    }


def _layer_tensors(name: str, mod: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    qt = mod.qtensor
    rows, cols = qt.shape
    bits = int(qt.meta["bits"])
    codes = original_order(stored_codes(qt), qt)  # act order only with per-row scales (_scheme)
    scales = qt.tensors["scales"]
    layout = GroupLayout(cols, int(qt.meta["group_size"]))
    t = {
        f"{name}.weight_packed": pack_int32(codes, bits),
        f"{name}.weight_scale": scales.reshape(rows, layout.count).to(dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    zeros = stored_zeros(qt)
    if zeros is not None:
        t[f"{name}.weight_zero_point"] = pack_int32(
            zeros.reshape(rows, layout.count).T.contiguous(), bits
        ).T.contiguous()
    if mod.bias is not None:
        t[f"{name}.bias"] = mod.bias.detach().to(dtype).contiguous()
    return t


def _refuse_structure(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, DenseNorm):
            raise ConfigError(
                f"compressed-tensors export: {name} is a rotated sandwich norm (a d × d matrix), which "
                "transformers' architecture has no place for"
            )
        if isinstance(mod, UnfusedExperts):
            raise ConfigError(
                "compressed-tensors export of mixture-of-experts models is not supported (experts are "
                f"per-expert linears in q2lab, fused tensors in transformers): {name}"
            )


def compressed_tensors_config(loaded: LoadedModel) -> tuple[dict[str, Any], list[str]]:
    """(quantization_config, quantized linear names); one config group per distinct scheme."""
    model = loaded.model
    _refuse_structure(model)
    groups: dict[str, dict[str, Any]] = {}
    quantized: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            scheme = _scheme(mod, name)
            key = repr(sorted(scheme.items()))
            groups.setdefault(key, {"targets": [], "weights": scheme})["targets"].append(name)
            quantized.append(name)
    if not quantized:
        raise ConfigError("compressed-tensors export: the model has no quantized linear (quantize it first)")
    ignore = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    config_groups = {
        f"group_{i}": {
            "targets": g["targets"],
            "weights": g["weights"],
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
        for i, g in enumerate(groups.values())
    }
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    return qconfig, quantized


def export_compressed_tensors(loaded: LoadedModel, out: str | Path) -> dict[str, Any]:
    """Write ``loaded`` (RTN/GPTQ-quantized, or a checkpoint of it) to folder ``out``; returns a
    summary (quantization_config, counts, bytes)."""
    qconfig, quantized = compressed_tensors_config(loaded)
    model = loaded.model
    dtype = float_dtype(model)
    tensors: dict[str, torch.Tensor] = {}
    for name in quantized:
        tensors.update(_layer_tensors(name, model.get_submodule(name), dtype))
    tensors.update(float_state(model, quantized, dtype))
    size = write_hf_folder(loaded, out, tensors, qconfig, quantized)
    return {
        "format": "compressed-tensors",
        "out": str(out),
        "quantization_config": qconfig,
        "quantized_linears": len(quantized),
        "float_linears": len(qconfig["ignore"]),
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": size,
    }
