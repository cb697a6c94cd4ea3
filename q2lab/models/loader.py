"""One entry point for every model source: zoo alias, HF directory, HF hub id, GGUF file,
or a q2lab quantized checkpoint.  Everything becomes a :class:`LoadedModel`: a float (or
quantized) transformers model, its tokenizer, and the provenance that goes into results."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from q2lab.errors import ModelError
from q2lab.models import gguf_loader, zoo
from q2lab.models.arch import find_decoder, prepare_model
from q2lab.models.lazy import load_lazy

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FULL_HASH_LIMIT = 1 << 30  # hash weight files fully below 1 GiB in total, else sample them
CHECKPOINT_MANIFEST = "q2lab_manifest.json"


@dataclass
class ModelInfo:
    """Provenance of a loaded model, recorded in every result."""

    name: str  # what the user passed
    kind: str  # zoo | hf_dir | hf_hub | gguf | checkpoint
    path: str  # resolved local path
    fingerprint: str  # content hash used in cache keys
    model_type: str
    add_bos: bool
    bos_token_id: int | None
    n_params: int
    dtype: str
    notes: list[str] = field(default_factory=list)
    # the Hessian store's description (corpus, windows, language, …) of a quantized model
    calibration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise ModelError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def load_model(
    source: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    lazy: bool = False,
) -> LoadedModel:
    """Load ``source`` (alias, directory, hub id, .gguf file, or q2lab checkpoint).

    ``lazy``: keep the decoder blocks in their safetensors files until calibration or quantization
    reads them one at a time (:mod:`q2lab.models.lazy`), for models larger than memory."""
    name = str(source)
    if lazy and device != "cpu":
        raise ModelError("lazy (out-of-core) loading runs on the CPU; load to another device without lazy")
    path = Path(name).expanduser()
    if zoo.is_alias(name):
        gguf_path = zoo.fetch(name)
        entry = zoo.ZOO[name.lower()]
        return _load_gguf(
            name,
            gguf_path,
            dtype,
            device,
            lazy=lazy,
            kind="zoo",
            digest=entry.sha256,
            notes=[f"float reference = dequantized shipped weights ({entry.shipped_as})"],
        )
    if path.exists():
        if path.is_dir() and (path / CHECKPOINT_MANIFEST).exists():
            from q2lab.models.checkpoint import load_checkpoint

            if lazy:
                raise ModelError(
                    f"{path} is a q2lab checkpoint: it loads whole (lazy loading is for float models)"
                )
            return load_checkpoint(path, device=device)
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(
                    f"{path} is a file but not a .gguf file; pass a model directory, a .gguf, or an alias"
                )
            return _load_gguf(
                name,
                path,
                dtype,
                device,
                lazy=lazy,
                kind="gguf",
                notes=["float reference = dequantized GGUF weights"],
            )
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory without config.json; not a Hugging Face model directory")
        return _load_hf_dir(name, path, dtype, device, kind="hf_dir", lazy=lazy)
    if name.lower().endswith(".gguf") or (os.sep in name and not _HUB_ID.match(name)):
        raise ModelError(f"model path {name} does not exist")
    if _HUB_ID.match(name):
        return _load_hf_dir(name, _resolve_hub(name), dtype, device, kind="hf_hub", lazy=lazy)
    raise ModelError(
        f"cannot resolve model {name!r}: not a zoo alias ({', '.join(sorted(zoo.ZOO))}), "
        "an existing path, or a Hugging Face hub id (org/name)"
    )


def _resolve_hub(repo_id: str) -> Path:
    """Local snapshot of a hub repo (downloads unless HF_HUB_OFFLINE=1; then the cache only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelError(f"cannot get {repo_id} from the Hugging Face hub or its local cache: {e}") from e


def _load_gguf(
    name: str,
    path: Path,
    dtype,
    device,
    *,
    kind: str,
    digest: str | None = None,
    notes: list[str],
    lazy: bool = False,
) -> LoadedModel:
    gguf_loader.check_gguf(path)
    converted, digest = gguf_loader.converted_dir(path, digest)
    src = gguf_loader.source_info(converted)
    loaded = _load_hf_dir(
        name, converted, dtype, device, kind=kind, fingerprint=digest, add_bos=src.get("add_bos"), lazy=lazy
    )
    loaded.info.path = str(path)
    loaded.info.notes.extend(notes)
    loaded.info.notes.append(f"BOS from the GGUF's tokenizer.ggml.add_bos_token = {src.get('add_bos')}")
    return loaded


def _load_hf_dir(
    name: str,
    path: Path,
    dtype,
    device,
    *,
    kind: str,
    fingerprint: str | None = None,
    add_bos: bool | None = None,
    lazy: bool = False,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # q2lab shows its own progress for long work

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        if lazy:
            model = load_lazy(path, _dtype(dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype))
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"transformers cannot load {path}: {e}") from e
    if not lazy:  # a lazy model is on the CPU already, its blocks on ``meta``
        prepare_model(model).to(device).eval()
    find_decoder(model)  # fail now, with a clear message, on unsupported architectures
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tok)
    info = ModelInfo(
        name=name,
        kind=kind,
        path=str(path),
        fingerprint=fingerprint or dir_fingerprint(path),
        model_type=str(getattr(model.config, "model_type", "?")),
        add_bos=bool(add_bos),
        bos_token_id=tok.bos_token_id,
        n_params=sum(p.numel() for p in model.parameters()),
        dtype=str(_dtype(dtype)).removeprefix("torch."),
    )
    if add_bos and tok.bos_token_id is None:
        raise ModelError(f"{name}: the model asks for a BOS token but its tokenizer defines none")
    return LoadedModel(model, tok, info)


def tokenizer_adds_bos(tok) -> bool:
    """Whether the tokenizer's own special-token template starts a text with BOS."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def dir_fingerprint(path: Path) -> str:
    """Content fingerprint of a model directory: config + weights (sampled above 1 GiB)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".model"})
    total = sum(p.stat().st_size for p in files if p.suffix in {".safetensors", ".bin"})
    for p in files:
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if total <= _FULL_HASH_LIMIT or p.suffix == ".json":
                while block := f.read(1 << 20):
                    h.update(block)
            else:  # large models: first and last MiB of each weight file plus its size
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest()
