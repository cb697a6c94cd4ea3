"""llama.cpp importance matrices: from q2lab's shared Hessians, and to/from llama.cpp's files.

An importance matrix is one non-negative value per input column of every weight matrix, the
mean of x² over the calibration tokens — exactly the diagonal of q2lab's Hessian ``XᵀX / n``,
so no separate calibration pass is needed.  Files come in the two formats llama.cpp reads:

* GGUF (what ``llama-imatrix`` writes by default): per tensor ``<name>.in_sum2`` (Σx², F32,
  ne = [cols, n_mat]) and ``<name>.counts`` (tokens, F32, ne = [1, n_mat]), with
  ``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``;
* legacy ``.dat``: int32 entry count, then per entry name, ``ncall`` and the values
  ``(Σx²/count)·ncall``, then the chunk count and the dataset name.

Reading normalises exactly as ``llama-quantize`` does (float32 ``sum / count``, or ``/ ncall``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from q2lab.errors import CorruptFileError, ModelError
from q2lab.utils.io import atomic_path


@dataclass
class Imatrix:
    """Per-tensor importance (GGUF tensor name → float32 values) with raw sums and counts."""

    values: dict[str, np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # Σx² as stored in GGUF files
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __len__(self) -> int:
        return len(self.values)

    def get(self, name: str) -> np.ndarray | None:
        return self.values.get(name)


def hessian_importance(h) -> tuple[np.ndarray, np.ndarray, int]:
    """(importance, Σx², n) of a :class:`~q2lab.calib.hessian.Hessian`, the way llama.cpp forms it.

    llama-quantize divides the stored float32 sums by the count in float32; computing the
    importance the same way makes a written-then-read imatrix give back identical values, so
    llama.cpp and q2lab quantize with bit-identical importance.
    """
    sums = np.diagonal(h.xtx.cpu().numpy()).astype(np.float32)
    count = int(h.n)
    return sums / np.float32(max(count, 1)), sums, count


def from_store(store, names: dict[str, str]) -> Imatrix:
    """Importance of each linear from the Hessian store; ``names`` maps GGUF name → module name."""
    values, counts, sums = {}, {}, {}
    for gguf_name, module in names.items():
        if module not in store.linears:
            continue
        values[gguf_name], sums[gguf_name], counts[gguf_name] = hessian_importance(store.hessian(module))
    desc = store.describe()
    return Imatrix(
        values,
        counts,
        sums,
        datasets=[str(desc.get("corpus", "q2lab"))],
        chunk_count=int(desc.get("windows", 0) or 0),
        chunk_size=int(desc.get("ctx", 0) or 0),
    )


def write_imatrix(path: str | Path, imatrix: Imatrix, *, legacy: bool | None = None) -> Path:
    """Write ``imatrix`` for llama.cpp (GGUF unless ``legacy`` or the name ends in ``.dat``)."""
    path = Path(path)
    legacy = path.suffix == ".dat" if legacy is None else legacy
    with atomic_path(path) as tmp:
        (_write_dat if legacy else _write_gguf)(tmp, imatrix)
    return path


def _write_gguf(path: Path, im: Imatrix) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", im.datasets or ["q2lab"])
    w.add_uint32("imatrix.chunk_count", im.chunk_count)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.values):
        count = im.counts.get(name, 1)
        sums = im.sums.get(name)
        if sums is None:
            sums = (im.values[name].astype(np.float64) * count).astype(np.float32)
        w.add_tensor(f"{name}.in_sum2", sums.reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_dat(path: Path, im: Imatrix) -> None:
    ncall = max(1, im.chunk_count)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(im.values)))
        for name in sorted(im.values):
            raw = name.encode()
            vals = (im.values[name].astype(np.float32) * np.float32(ncall)).astype("<f4")
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
            f.write(vals.tobytes())
        dataset = (im.datasets[-1] if im.datasets else "").encode()
        f.write(struct.pack("<ii", im.chunk_count, len(dataset)) + dataset)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp imatrix file (GGUF or legacy .dat) into normalised per-tensor values."""
    path = Path(path)
    try:
        head = path.read_bytes()[:4]
    except OSError as e:
        raise ModelError(f"cannot read imatrix file {path}: {e.strerror}") from e
    return _read_gguf(path) if head == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in r.fields.items() if k.startswith(("imatrix.", "general."))}
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise CorruptFileError(f"{path} is a corrupt or truncated GGUF imatrix: {e}") from e
    if not {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= set(fields):
        raise CorruptFileError(f"{path} is a GGUF file without imatrix metadata (not an imatrix?)")
    values, counts, raw = {}, {}, {}
    for tname, sums in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        if f"{name}.counts" not in tensors:
            raise CorruptFileError(f"{path}: {name} has sums but no counts")
        cnt = np.rint(tensors[f"{name}.counts"].reshape(-1)).astype(np.float32)
        sums = sums.reshape(cnt.size, -1)
        safe = np.where(cnt > 0, cnt, np.float32(1))[:, None]
        values[name] = np.where(cnt[:, None] > 0, sums / safe, np.float32(1)).reshape(-1).astype(np.float32)
        counts[name] = int(cnt.max())
        raw[name] = sums.reshape(-1)
    if not values:
        raise CorruptFileError(f"{path} holds no imatrix entries")
    ds = fields["imatrix.datasets"]
    return Imatrix(
        values,
        counts,
        raw,
        datasets=list(ds) if isinstance(ds, list) else [str(ds)],
        chunk_count=int(fields["imatrix.chunk_count"]),
        chunk_size=int(fields["imatrix.chunk_size"]),
    )


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptFileError(f"{path} is a truncated or corrupt imatrix .dat file (at byte {pos})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise CorruptFileError(f"{path} is neither a GGUF nor a legacy .dat imatrix ({n} entries?)")
    values, counts = {}, {}
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 < ln < 4096:
            raise CorruptFileError(f"{path} is a corrupt imatrix .dat file (name length {ln})")
        name = bytes(take(f"<{ln}s")[0]).decode(errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise CorruptFileError(f"{path}: entry {name} has {nval} values")
        vals = np.asarray(take(f"<{nval}f"), dtype=np.float32)
        values[name] = vals / np.float32(ncall) if ncall > 0 else vals
        counts[name] = int(ncall)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if 0 < ln <= len(data) - pos:
                datasets = [bytes(take(f"<{ln}s")[0]).decode(errors="replace")]
    return Imatrix(values, counts, datasets=datasets, chunk_count=chunk_count)
