"""llama.cpp as a peer (optional extra ``q2lab[llamacpp]``): its quantizers, its file quantizer,
its perplexity — the oracle our GGML types are tested against and the benchmark baseline.

Everything goes through ``llama-cpp-python``'s shared libraries with ctypes; no llama.cpp
programs are needed.  Nothing here is imported by q2lab's own quantization code.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from q2lab.errors import ModelError

# llama_ftype values (llama.h) for the file types q2lab reproduces.
FTYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "IQ4_NL": 25,
    "IQ2_S": 28,
    "IQ2_M": 29,
}


def available() -> bool:
    """Whether llama-cpp-python (and so llama.cpp's libraries) can be imported."""
    try:
        _llama()
    except ModelError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _llama():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise ModelError(f"llama.cpp is not available (pip install 'q2lab[llamacpp]'): {e}") from e
    return llama_cpp


@functools.lru_cache(maxsize=1)
def _ggml_base() -> ctypes.CDLL:
    lib_dir = Path(_llama().__file__).parent / "lib"
    names = sorted(lib_dir.glob("libggml-base.*")) if lib_dir.is_dir() else []
    if not names:
        raise ModelError(f"libggml-base not found next to llama_cpp in {lib_dir}")
    lib = ctypes.CDLL(str(names[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def quantize_chunk(type_id: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``ggml_quantize_chunk`` on a float32 matrix: (rows × n) → row bytes (uint8)."""
    lib = _ggml_base()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    row_size = lib.ggml_row_size(type_id, n)
    out = np.zeros((rows, row_size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_init(type_id)
    lib.ggml_quantize_chunk(
        type_id, x.ctypes.data, out.ctypes.data, 0, rows, n, None if qw is None else qw.ctypes.data
    )
    return out


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    ftype: str,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    pure: bool = False,
    nthread: int = 0,
) -> None:
    """``llama_model_quantize``: quantize the GGUF ``src`` to ``dst`` with file type ``ftype``.

    ``imatrix`` maps GGUF tensor names (``blk.0.attn_q.weight``) to per-column importances;
    it is passed as llama.cpp's NULL-terminated ``llama_model_imatrix_data`` array.
    """
    llama = _llama()
    if ftype.upper() not in FTYPES:
        raise ModelError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(FTYPES)}")
    params = llama.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype.upper()]
    params.nthread = nthread
    params.pure = pure
    keep = []
    if imatrix:
        entries = (llama.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantize {src} to {ftype} (see its log above)")


class Runner:
    """A GGUF loaded in llama.cpp (CPU) that returns the logits of every position of a sequence."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None) -> None:
        llama = _llama()
        try:
            self.llm = llama.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                logits_all=True,
                n_threads=n_threads or max(1, (os.cpu_count() or 1)),
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"llama.cpp cannot load {path}: {e}") from e

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) float32 logits, each position seeing only its prefix."""
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def nll(self, window: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood of tokens 1… of ``window`` given their prefixes."""
        lg = self.logits(window)[:-1].astype(np.float64)
        lg -= lg.max(axis=1, keepdims=True)
        logz = np.log(np.exp(lg).sum(axis=1))
        tgt = np.asarray(window[1:])
        return float((logz - lg[np.arange(len(tgt)), tgt]).sum()), len(tgt)


def logits(path: str | os.PathLike, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for ``tokens`` from the GGUF at ``path``."""
    return Runner(path, n_ctx=max(8, len(tokens))).logits(tokens)


def perplexity(path: str | os.PathLike, windows) -> float:
    """llama.cpp's perplexity over q2lab's token windows ((n, ctx) ids; positions 1… scored)."""
    rows = [list(map(int, w)) for w in np.asarray(windows)]
    runner = Runner(path, n_ctx=len(rows[0]))
    total, count = 0.0, 0
    for w in rows:
        nll, n = runner.nll(w)
        total, count = total + nll, count + n
    return float(np.exp(total / count))
