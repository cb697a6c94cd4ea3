"""q2lab quantized checkpoints, the reading side: one safetensors file plus a JSON manifest.

Layout of a checkpoint folder (written by :func:`q2lab.export.checkpoint.save_checkpoint`)::

    q2lab_manifest.json   format, base model provenance, quantization report, per-linear format
    model.safetensors     every QuantizedTensor's stored tensors ("<linear>.<name>") and every
                          float tensor of the model (embeddings, norms, biases), tied ones once
    block_NNNN.safetensors  (a checkpoint streamed from an out-of-core model) block NNNN's
                          tensors; the manifest's ``files`` then lists every weights file
    config.json, tokenizer files  (so the folder loads without the original model)

Loading rebuilds the architecture from ``config.json`` without initialising weights, puts a
:class:`QuantLinear` where each quantized linear was (through its method's ``make_linear``), and
fills everything from the file, so the logits of a loaded checkpoint are bit-identical to those
of the model that was saved.  Reading lives with loading, writing with export: loading imports
no writer (docs/DESIGN.md, "Import rules").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from q2lab.errors import CorruptFileError
from q2lab.models.arch import prepare_model
from q2lab.models.loader import CHECKPOINT_MANIFEST, LoadedModel, ModelInfo
from q2lab.quant.base import QuantizedTensor, get_quantizer
from q2lab.quant.linear import QuantLinear
from q2lab.transforms.rotate import DenseNorm

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / CHECKPOINT_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"checkpoint {path}: cannot read {CHECKPOINT_MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise CorruptFileError(f"checkpoint {path}: unsupported format {manifest.get('format')!r}")
    return manifest


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a folder written by :func:`save_checkpoint`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path)
    manifest = read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    for fname in manifest.get("files", [WEIGHTS]):  # streamed checkpoints have one file per block
        try:
            tensors.update(load_file(str(path / fname)))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CorruptFileError(f"checkpoint {path}: cannot read {fname}: {e}") from e
    try:
        config = AutoConfig.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CorruptFileError(f"checkpoint {path}: cannot read its config or tokenizer: {e}") from e
    dtype = getattr(torch, manifest["base"].get("dtype", "float32"))
    with no_init_weights():
        model = prepare_model(AutoModelForCausalLM.from_config(config, dtype=dtype))
    for name, spec in manifest["quantized"].items():
        model.set_submodule(name, _quant_linear(path, name, spec, tensors))
    for name, eps in manifest.get("dense_norms", {}).items():
        matrix = tensors.get(f"{name}.weight")
        if matrix is None or matrix.ndim != 2:
            raise CorruptFileError(f"checkpoint {path}: the dense norm {name} has no d × d weight")
        model.set_submodule(name, DenseNorm(matrix, float(eps), matrix.dtype))
    float_state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in manifest["quantized"]}
    missing, unexpected = model.load_state_dict(float_state, strict=False, assign=True)
    if unexpected:
        raise CorruptFileError(
            f"checkpoint {path}: tensors {unexpected[:5]} do not belong to a {config.model_type} model"
        )
    for alias, target in manifest["aliases"].items():
        owner, attr = alias.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, _get_tensor(model, target))
    # Quantized linears were rebuilt from their own tensors above; aliases were just tied.
    missing = [
        k
        for k in missing
        if k not in manifest["aliases"] and k.rsplit(".", 1)[0] not in manifest["quantized"]
    ]
    if missing:
        raise CorruptFileError(f"checkpoint {path}: missing tensors {missing[:5]}")
    model.to(device).eval()
    base = manifest["base"]
    info = ModelInfo(
        **{
            **base,
            "name": str(path),
            "kind": "checkpoint",
            "path": str(path),
            "notes": [
                *base.get("notes", []),
                f"quantized with {manifest['quantization'].get('method', '?')}",
            ],
            "calibration": base.get("calibration") or manifest["quantization"].get("hessians"),
        }
    )
    loaded = LoadedModel(model, tok, info)
    loaded.manifest = manifest  # type: ignore[attr-defined]
    return loaded


def _get_tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    owner, attr = key.rsplit(".", 1)
    return getattr(model.get_submodule(owner), attr)


def _quant_linear(
    path: Path, name: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> QuantLinear:
    stored = {}
    for tname, (dtype, shape) in spec["tensors"].items():
        t = tensors.get(f"{name}.{tname}")
        if t is None:
            raise CorruptFileError(f"checkpoint {path}: tensor {name}.{tname} is missing")
        got = str(t.dtype).removeprefix("torch.")
        if got != dtype or list(t.shape) != shape:
            raise CorruptFileError(
                f"checkpoint {path}: tensor {name}.{tname} is {got} {list(t.shape)}, expected {dtype} {shape}"
            )
        stored[tname] = t
    qt = QuantizedTensor(spec["method"], tuple(spec["shape"]), stored, spec["meta"], spec["bit_counts"])
    bias = tensors.get(f"{name}.bias")
    if spec["bias"] and bias is None:
        raise CorruptFileError(f"checkpoint {path}: bias of {name} is missing")
    return get_quantizer(qt.method).make_linear(qt, bias)
