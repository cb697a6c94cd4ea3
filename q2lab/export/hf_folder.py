"""Hugging Face folders with a ``quantization_config`` (AQLM, compressed-tensors): the parts every
such exporter shares — the float tensors beside the quantized ones, and the atomic write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from q2lab.models.loader import LoadedModel
from q2lab.utils.io import atomic_path

WEIGHTS = "model.safetensors"


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float tensors (embeddings, norms), which the export keeps."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def float_state(model: nn.Module, quantized: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor outside the ``quantized`` linears, tied ones once (transformers re-ties them)."""
    skip = tuple(f"{q}." for q in quantized)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(skip):
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            continue
        seen.add(ptr)
        out[key] = value.detach().to(dtype if value.is_floating_point() else value.dtype).contiguous()
    return out


def write_hf_folder(
    loaded: LoadedModel,
    out: str | Path,
    tensors: dict[str, torch.Tensor],
    qconfig: dict[str, Any],
    quantized: list[str],
) -> int:
    """Write weights, config (with ``qconfig``) and tokenizer to folder ``out`` atomically; a
    quantized ``lm_head`` unties the embeddings.  Returns the weights file's size in bytes."""
    model = loaded.model
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quantization_config = qconfig
    if getattr(config, "tie_word_embeddings", False) and any(q.endswith("lm_head") for q in quantized):
        config.tie_word_embeddings = False  # a quantized lm_head cannot share the float embeddings
    with atomic_path(out, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return (Path(out) / WEIGHTS).stat().st_size
