"""Resume files: finished pieces of a long evaluation (IFEval answers, generated samples), one
JSON line each, tagged with the settings that produced them.

A line is readable on its own and fsynced as written, so a run killed mid-way keeps everything
it finished; a line cut by the crash is skipped (that piece is produced again), and lines whose
settings differ from the current ones are ignored rather than mixed into the results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_resume(path: str | Path | None, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``key → row`` of every intact line of ``path`` written with exactly these ``settings``
    (a later line for the same key wins); empty when the file does not exist."""
    if path is None or not Path(path).exists():
        return {}
    out: dict[str, dict[str, Any]] = {}
    want = json.loads(json.dumps(dict(settings)))  # compare as JSON round-trips it (tuples → lists)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that piece is produced again
            if isinstance(rec, dict) and rec.get("settings") == want and "key" in rec:
                out[str(rec["key"])] = rec["row"]
    return out


def append_resume(
    path: str | Path, settings: Mapping[str, Any], rows: Mapping[Any, Mapping[str, Any]]
) -> None:
    """Append one line per ``key → row`` and fsync.  A last line torn by a crash is closed first,
    so the new lines stay readable."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = "".join(
        json.dumps({"key": str(k), "row": dict(r), "settings": dict(settings)}, ensure_ascii=False) + "\n"
        for k, r in rows.items()
    )
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            data = "\n" + data
        f.write(data.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
