"""q2lab quantized checkpoints, the writing side: one safetensors file plus a JSON manifest.

Layout of a checkpoint folder (read back by :func:`q2lab.models.checkpoint.load_checkpoint`,
which ``load_model`` calls on such a folder)::

    q2lab_manifest.json   format, base model provenance, quantization report, per-linear format
    model.safetensors     every QuantizedTensor's stored tensors ("<linear>.<name>") and every
                          float tensor of the model (embeddings, norms, biases), tied ones once
    config.json, tokenizer files  (so the folder loads without the original model)

The format (manifest name, version, weights file) is defined by the reader, which this writer
follows; a loaded checkpoint's logits are bit-identical to those of the model that was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from q2lab.models.checkpoint import FORMAT_VERSION, WEIGHTS
from q2lab.models.loader import CHECKPOINT_MANIFEST, LoadedModel
from q2lab.quant.linear import QuantLinear
from q2lab.transforms.rotate import DenseNorm
from q2lab.utils.io import atomic_path, write_json_atomic
from q2lab.utils.provenance import versions

PLAN_FILE = "mixed-plan.yaml"  # auto's plan as a `mixed` method entry


def save_checkpoint(loaded: LoadedModel, out: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` (quantized in place by :func:`quantize_model`) to folder ``out``."""
    out = Path(out)
    model = loaded.model
    quantized: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            qt = mod.qtensor
            quantized[name] = {
                "method": qt.method,
                "shape": list(qt.shape),
                "meta": qt.meta,
                "bit_counts": qt.bit_counts,
                "tensors": {
                    k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in qt.tensors.items()
                },
                "bias": mod.bias is not None,
            }
            for k, v in qt.tensors.items():
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    # Rotated sandwich norms hold a d × d matrix where the architecture has a d-vector: the
    # reader rebuilds them before filling the weights.
    dense_norms = {name: mod.eps for name, mod in model.named_modules() if isinstance(mod, DenseNorm)}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized and key.rsplit(".", 1)[1].startswith("q_"):
            continue  # already stored under its QuantizedTensor name
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            aliases[key] = seen[ptr]  # tied weights (e.g. lm_head ↔ embeddings) are stored once
            continue
        seen[ptr] = key
        tensors[key] = value.detach().cpu().contiguous()
    manifest = {
        "format": FORMAT_VERSION,
        "base": loaded.info.to_dict(),
        "quantization": report or {},
        "quantized": quantized,
        "aliases": aliases,
        "dense_norms": dense_norms,
        "versions": versions(),
    }
    with atomic_path(out, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / CHECKPOINT_MANIFEST, manifest)
        if report and report.get("plan"):  # auto's allocation, editable and rerunnable as `mixed`
            import yaml

            plan = {k: v for k, v in report["plan"].items() if k != "stats"}
            (tmp / PLAN_FILE).write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return out
