"""GGUF files → float transformers models, converted once and cached.

transformers dequantizes GGUF tensors to float and builds the tokenizer from the file's own
vocabulary (≈ 20 s for SmolLM2, ≈ 60 s for Gemma 3).  We do that once per file content and
cache the result as a plain Hugging Face directory (safetensors + tokenizer), which then
loads in well under a second with bit-identical weights and tokenization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from q2lab.errors import CorruptFileError, ModelError
from q2lab.utils.io import atomic_path, cache_dir, sha256_file, write_json_atomic
from q2lab.utils.tensorfile import write_safetensors

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "q2lab_source.json"


def check_gguf(path: Path) -> None:
    """Fail with a clear message unless ``path`` looks like a readable GGUF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read GGUF file {path}: {e.strerror}") from e
    if head != GGUF_MAGIC:
        raise CorruptFileError(f"{path} is not a GGUF file (magic {head!r}, expected b'GGUF')")


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (architecture, tokenizer flags, ...), validated."""
    import gguf

    check_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {}
        for key, fld in reader.fields.items():
            if len(fld.data) == 1 and not key.startswith("tokenizer.ggml.merges"):
                value = fld.contents()
                if not isinstance(value, list):
                    meta[key] = value
        expected = sum(int(t.n_bytes) for t in reader.tensors)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise CorruptFileError(f"{path} is a corrupt or truncated GGUF file: {e}") from e
    if expected <= 0 or not reader.tensors:
        raise CorruptFileError(f"{path} holds no tensors")
    meta["_tensor_count"] = len(reader.tensors)
    return meta


def gguf_add_bos(meta: dict[str, Any]) -> bool | None:
    value = meta.get("tokenizer.ggml.add_bos_token")
    return None if value is None else bool(value)


def converted_dir(path: Path, digest: str | None = None) -> tuple[Path, str]:
    """Cache folder holding the float conversion of the GGUF at ``path`` (created on demand)."""
    digest = digest or sha256_file(path)
    out = cache_dir() / "converted" / digest[:20]
    if not (out / SOURCE_FILE).exists():
        _convert(path, out, digest)
    return out, digest


def _convert(path: Path, out: Path, digest: str, streamed: bool | None = None) -> None:
    """Write the float conversion of ``path`` to ``out``.  Architectures q2lab exports to GGUF
    (their tensor naming is shared, :mod:`q2lab.quant.ggml.archs`) are converted one tensor at a
    time into one safetensors shard per decoder block, so a model larger than memory converts
    (and then loads lazily); the others go through transformers' whole-model conversion.
    ``streamed`` forces one path (tests compare the two)."""
    from transformers import AutoConfig, AutoTokenizer

    meta = read_metadata(path)
    arch = meta.get("general.architecture", "?")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ModelError(f"transformers cannot read GGUF {path} (architecture {arch}): {e}") from e
    from q2lab.quant.ggml.archs import ARCHS

    if streamed is None:  # experts' 3-D tensors: transformers' own conversion splits them
        streamed = config.model_type in ARCHS and not ARCHS[config.model_type].experts
    with atomic_path(out, is_dir=True) as tmp:
        if streamed:
            _convert_tensors(path, tmp, config)
        else:
            _convert_whole(path, tmp, arch)
        tok.save_pretrained(tmp)
        write_json_atomic(
            tmp / SOURCE_FILE,
            {
                "gguf": str(path),
                "sha256": digest,
                "add_bos": gguf_add_bos(meta),
                "architecture": meta.get("general.architecture"),
                "file_type": meta.get("general.file_type"),
            },
        )


def _convert_whole(path: Path, tmp: Path, arch: str) -> None:
    """transformers' conversion: the whole float model in memory, saved."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ModelError(f"transformers cannot load GGUF {path} (architecture {arch}): {e}") from e
    # The float model is a plain model now: drop the GGUF "quantizer" marker so it saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)


def _drop_pages(reader: Any) -> None:
    """Let go of the GGUF pages read so far: touched pages of a file mapping count in the
    process's resident set until unmapped, and the file of a large model is larger than RAM."""
    import mmap

    mm = getattr(getattr(reader, "data", None), "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _convert_tensors(path: Path, tmp: Path, config: Any) -> None:
    """Dequantize ``path`` tensor by tensor into float32 shards (one per block, one for the
    rest) with a ``model.safetensors.index.json``; memory: one block's float tensors."""
    import gguf
    import gguf.quants as gq
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from q2lab.quant.ggml.archs import ARCHS, from_gguf_layout, gguf_order, hf_key

    spec = ARCHS[config.model_type]
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise CorruptFileError(f"{path} is a corrupt or truncated GGUF file: {e}") from e
    groups: dict[int, list[Any]] = {}  # block index (-1: not in a block) → its tensors
    for t in reader.tensors:
        groups.setdefault(gguf_order(t.name)[0], []).append(t)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    files = {b: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, b in enumerate(sorted(groups))}
    weight_map: dict[str, str] = {}
    for b in sorted(groups):
        tensors = {}
        for t in groups[b]:
            key = hf_key(t.name, spec)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
            arr = np.array(gq.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # a copy
            tensors[key] = torch.from_numpy(from_gguf_layout(key, arr, spec, n_head, n_kv))
        write_safetensors(tmp / files[b], tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, files[b]))
        _drop_pages(reader)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = torch.float32
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)


def source_info(converted: Path) -> dict[str, Any]:
    return json.loads((converted / SOURCE_FILE).read_text())
