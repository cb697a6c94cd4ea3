"""Progress bars for long work (tqdm on stderr); silenced with Q2LAB_QUIET=1."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    if os.environ.get("Q2LAB_QUIET") == "1":
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
