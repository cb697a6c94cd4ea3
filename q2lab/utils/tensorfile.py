"""safetensors files read and written without whole-file copies in memory.

``safetensors.torch.save_file`` serializes every tensor to a ``bytes`` object before writing,
so saving 2 GiB of Hessians (one 7B block) peaks at 4 GiB; ``load_file`` and ``safe_open`` map
the file, and the pages a process touches in a mapping count in its resident set until it is
unmapped.  For out-of-core work (a block of a model larger than memory, a block's Hessians) this
module writes each tensor straight from its storage and reads a named tensor with positioned
reads into its final buffer (chunked when it changes dtype).  The format is safetensors' own:
the files are read and written by the ``safetensors`` package too (tests check both ways).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from q2lab.errors import CorruptFileError, ModelError

INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 64 << 20  # bytes per positioned read when a read converts dtype


def read_header(path: Path) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """({name: (dtype, shape, absolute start, absolute end)}, metadata) of a safetensors file,
    checked against the file's size so a truncated file fails here, not halfway through a job."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file: {e}") from e
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = spec.get("dtype")
        if dtype not in DTYPES:
            raise CorruptFileError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        start, end = (8 + n + int(o) for o in spec["data_offsets"])
        if end > size:
            raise CorruptFileError(f"{path} is truncated: tensor {name} ends at byte {end} of {size}")
        numel = 1
        for d in spec["shape"]:
            numel *= int(d)
        if end - start != numel * DTYPES[dtype].itemsize:
            raise CorruptFileError(f"{path}: tensor {name} has {end - start} bytes, its shape needs more")
        out[name] = (dtype, [int(d) for d in spec["shape"]], start, end)
    return out, dict(header.get("__metadata__") or {})


class SafetensorsFiles:
    """Named tensors of one safetensors file or a folder of them (a sharded folder's
    ``model.safetensors.index.json`` names the files; else every ``*.safetensors``)."""

    def __init__(self, source: Path) -> None:
        source = Path(source)
        self.folder = source if source.is_dir() else source.parent
        files = self._files(source)
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for path in files:
            for name, (dtype, shape, start, end) in read_header(path)[0].items():
                self.entries[name] = (path, dtype, shape, start, end)

    @staticmethod
    def _files(source: Path) -> list[Path]:
        if source.is_file():
            return [source]
        index = source / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CorruptFileError(f"{index}: cannot read its weight_map: {e}") from e
            return sorted({source / f for f in weight_map.values()})
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{source} has no .safetensors files")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` (a new tensor, cast to ``dtype`` when given); extra memory beyond the
        result: one read chunk when the dtype changes, none otherwise."""
        if name not in self.entries:
            raise ModelError(f"{self.folder}: no tensor {name} in its safetensors files")
        path, st_dtype, shape, start, end = self.entries[name]
        src = DTYPES[st_dtype]
        out = torch.empty(shape, dtype=dtype or src)
        flat = out.view(-1)
        step = max(1, _CHUNK // src.itemsize)
        convert = out.dtype != src
        with open(path, "rb", buffering=0) as f:
            for i in range(0, flat.numel(), step):
                m = min(step, flat.numel() - i)
                buf = torch.empty(m, dtype=src) if convert else flat[i : i + m]
                f.seek(start + i * src.itemsize)
                view = memoryview(buf.view(torch.uint8).numpy())
                got = 0
                while got < len(view):
                    k = f.readinto(view[got:])
                    if not k:
                        raise CorruptFileError(f"{path} is truncated: tensor {name} needs bytes up to {end}")
                    got += k
                if convert:
                    flat[i : i + m] = buf
        return out


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file, each straight from its (CPU, contiguous) storage."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    ordered = sorted(tensors.items())
    for name, t in ordered:
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in ordered:
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
