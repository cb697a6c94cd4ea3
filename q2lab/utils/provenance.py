"""Versions and environment recorded into every result record, so results can be reproduced."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

_PACKAGES = ("q2lab", "torch", "transformers", "gguf", "safetensors", "numpy", "tokenizers")


@functools.cache
def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    commit, dirty = git_state(Path(__file__).resolve().parents[2])
    if commit:
        out["q2lab_commit"] = commit
        if dirty:
            out["q2lab_dirty"] = (
                "yes"  # tracked files differed from the commit: the commit alone does not reproduce
            )
    return out


def git_state(root: Path) -> tuple[str | None, bool]:
    """``(HEAD commit, tracked files modified)`` of the checkout at ``root``; ``(None, False)``
    outside a git checkout.  :func:`versions` caches it, so a study records the state it
    started from (the runner calls it first), not a later commit of a long run."""
    if not (root / ".git").exists():
        return None, False

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout if res.returncode == 0 else None

    head = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head, bool(head and status and status.strip())


def machine() -> dict[str, str | int]:
    import os

    import torch

    info: dict[str, str | int] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "blas": _blas(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


@functools.cache
def _blas() -> str:
    """The BLAS torch was built with (``mkl``, ``open``, …): float sums, and so results, depend on it."""
    import re

    import torch

    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return found.group(1) if found else "unknown"
