"""Where data comes from: named data sets under ``$Q2LAB_DATA`` (the staged folder, see
``shared/data/SOURCES.md``), or explicit local paths.  Every resolved data set carries the
sha256 of the bytes it was read from, which goes into every result record."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from q2lab.errors import DataError


def data_root() -> Path:
    root = os.environ.get("Q2LAB_DATA")
    if not root:
        raise DataError(
            "Q2LAB_DATA is not set: point it at the staged data folder "
            "(e.g. export Q2LAB_DATA=../shared/data) "
            "or pass a local file path instead of a data set name"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"Q2LAB_DATA={root} is not a directory")
    return path


def data_file(relative: str) -> Path:
    """A file inside ``$Q2LAB_DATA``, or a clear error naming the file and the variable."""
    path = data_root() / relative
    if not path.exists():
        raise DataError(f"missing data file {path} (Q2LAB_DATA selects the data folder; see its SOURCES.md)")
    return path


def local_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} file {p} does not exist")
    return p


def looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith(".") or Path(name).suffix in {".txt", ".jsonl", ".json", ".raw"}


def hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def seeded_subset(n: int, size: int, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``size`` out of ``n``, in increasing order (NumPy's
    default generator, without replacement).  One home, so a task's scored subset and the prompts
    held apart from it (the chat suite's IFEval slice) are computed the same way."""
    import numpy as np

    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=size, replace=False))
