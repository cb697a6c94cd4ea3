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


class _Quiet:
    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...

    def close(self) -> None: ...


def progress_bar(desc: str, total: int, unit: str = "it", initial: int = 0):
    """A bar advanced by hand (``update(n)``, ``set_postfix_str``, ``close``), for loops whose
    rate is better told in another unit than their iterations (training: tokens/s)."""
    if os.environ.get("Q2LAB_QUIET") == "1":
        return _Quiet()
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, unit=unit, initial=initial, leave=False, dynamic_ncols=True)
