"""llama.cpp's own ``llama-quantize`` program, built once per installed llama-cpp-python version.

llama-cpp-python ships llama.cpp's shared libraries but none of its programs, and the importance
matrix *file* reader lives in the program (``tools/quantize`` + ``common/imatrix-loader.cpp``), not
in the libraries.  To test that llama.cpp accepts the imatrix files q2lab writes (and that q2lab
reads llama.cpp's), we compile exactly those llama.cpp sources, unmodified, from the sdist of the
installed llama-cpp-python version, against its installed libraries.  The few libcommon symbols
they need come from ``llama_tools_shim.cpp`` (logging, build info, string splitting; nothing that
reads or quantizes).  ≈ 10 s with g++; the binary is cached under q2lab's cache folder.

Run ``python -m tests.oracles.llama_tools`` to build it ahead of the tests (``make
install-llamacpp`` does).  The source comes from ``$Q2LAB_LLAMACPP_SRC`` (an unpacked sdist or
llama.cpp checkout) or is fetched with ``pip download --no-binary :all: llama-cpp-python==VERSION``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from q2lab.utils.io import atomic_path, cache_dir

SHIM = Path(__file__).with_name("llama_tools_shim.cpp")
SOURCES = ("tools/quantize/quantize.cpp", "tools/quantize/main.cpp", "common/imatrix-loader.cpp")
INCLUDES = ("include", "ggml/include", "common", "tools/quantize")


class ToolBuildError(RuntimeError):
    """llama-quantize could not be built (no compiler, no source, or a compile error)."""


def _llama_cpp():
    import llama_cpp

    return llama_cpp


def tool_dir() -> Path:
    return cache_dir() / "llamacpp-tools" / _llama_cpp().__version__


def quantize_tool() -> Path:
    """Path of llama.cpp's ``llama-quantize`` for the installed llama-cpp-python (built if needed)."""
    exe = tool_dir() / "llama-quantize"
    if not exe.exists():
        build(exe)
    return exe


def _source_root(workdir: Path) -> Path:
    given = os.environ.get("Q2LAB_LLAMACPP_SRC")
    if given:
        root = Path(given)
        return root / "vendor" / "llama.cpp" if (root / "vendor" / "llama.cpp").is_dir() else root
    version = _llama_cpp().__version__
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-q",
        "-d",
        str(workdir),
    ]
    done = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
    sdists = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        raise ToolBuildError(
            f"cannot download the llama-cpp-python {version} sdist: {done.stderr.strip()[-500:]}"
        )
    prefix = f"{sdists[0].name[: -len('.tar.gz')]}/vendor/llama.cpp/"
    wanted = (*SOURCES, *(f"{d}/" for d in INCLUDES))
    with tarfile.open(sdists[0]) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
        ]
        tar.extractall(workdir, members=members, filter="data")
    return workdir / prefix


def build(exe: Path) -> Path:
    """Compile ``llama-quantize`` into ``exe`` (atomically: a failed build leaves nothing)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise ToolBuildError("no C++ compiler (g++) on PATH to build llama.cpp's llama-quantize")
    lib_dir = Path(_llama_cpp().__file__).parent / "lib"
    with tempfile.TemporaryDirectory() as work:
        root = _source_root(Path(work))
        missing = [s for s in SOURCES if not (root / s).is_file()]
        if missing:
            raise ToolBuildError(f"llama.cpp source at {root} lacks {', '.join(missing)}")
        exe.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(exe) as tmp:
            cmd = [compiler, "-O1", "-std=c++17", *(f"-I{root / d}" for d in INCLUDES)]
            cmd += [
                *(str(root / s) for s in SOURCES),
                str(SHIM),
                f"-L{lib_dir}",
                "-lllama",
                "-lggml",
                "-lggml-base",
            ]
            cmd += [f"-Wl,-rpath,{lib_dir}", "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ToolBuildError(f"building llama-quantize failed:\n{done.stderr[-2000:]}")
            os.chmod(tmp, 0o755)
    return exe


def run_quantize(src: Path, dst: Path, ftype: str, *, imatrix: Path | None = None, nthread: int = 1) -> str:
    """``llama-quantize [--imatrix F] src dst FTYPE nthread``; returns its log, raises on failure."""
    cmd = [str(quantize_tool())]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(dst), ftype, str(nthread)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"llama-quantize exited with {done.returncode}:\n{log[-3000:]}")
    return log


if __name__ == "__main__":
    print(quantize_tool())
