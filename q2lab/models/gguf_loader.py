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


def _convert(path: Path, out: Path, digest: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_metadata(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        arch = meta.get("general.architecture", "?")
        raise ModelError(f"transformers cannot load GGUF {path} (architecture {arch}): {e}") from e
    # The float model is a plain model now: drop the GGUF "quantizer" marker so it saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp)
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


def source_info(converted: Path) -> dict[str, Any]:
    return json.loads((converted / SOURCE_FILE).read_text())
