"""GGML block types: one class per type, registered by name, exact GGUF block bytes.

Like gguf-py's ``quants`` module, each type is a class with vectorised ``quantize_rows`` /
``dequantize_blocks``; unlike it, quantization reproduces llama.cpp's C quantizers bit for
bit (the reference ``quantize_row_*_ref`` paths without an importance matrix, the
importance-weighted ``quantize_*`` paths with one) — see :mod:`q2lab.quant.ggml.fp`.

A type quantizes rows of ``n`` weights, ``n`` a multiple of its block size; an importance
matrix is one non-negative weight per column (llama.cpp's imatrix entry for the tensor).
Work is split into row chunks so memory stays bounded on large matrices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import gguf
import numpy as np

from q2lab.errors import ConfigError, CorruptFileError, ShapeError
from q2lab.quant.ggml.fp import F32

QK_K = 256
_CHUNK_WEIGHTS = 1 << 18  # weights per work chunk: keeps temporaries at a few MB

_TYPES: dict[str, type[GGMLType]] = {}


class GGMLType(ABC):
    """A GGML quantization type.  Subclasses set ``name`` and ``layout`` and are registered."""

    name: ClassVar[str]  # GGML spelling, e.g. "Q4_K"
    qtype: ClassVar[gguf.GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # bytes per block of each stored component, in block order (sums to type_size)
    layout: ClassVar[tuple[tuple[str, int], ...]]
    requires_imatrix: ClassVar[bool] = False  # llama.cpp refuses to quantize without one
    reference_path: ClassVar[bool] = True  # ggml has a no-imatrix quantizer (IQ2_XXS/XS have none)
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__:
            return
        cls.qtype = gguf.GGMLQuantizationType[cls.name]
        cls.block_size, cls.type_size = gguf.GGML_QUANT_SIZES[cls.qtype]
        if sum(b for _, b in cls.layout) != cls.type_size:
            raise RuntimeError(f"{cls.name}: layout does not add up to {cls.type_size} bytes")
        _TYPES[cls.name.lower()] = cls

    # ------------------------------------------------------------------ sizes
    @classmethod
    def row_bytes(cls, n: int) -> int:
        return n // cls.block_size * cls.type_size

    @classmethod
    def bits_per_weight(cls) -> float:
        return cls.type_size * 8 / cls.block_size

    @classmethod
    def bit_counts(cls, rows: int, n: int) -> dict[str, int]:
        """Exact storage bits of a (rows × n) tensor, per component."""
        blocks = rows * (n // cls.block_size)
        return {name: blocks * nbytes * 8 for name, nbytes in cls.layout}

    @classmethod
    def can_hold(cls, n: int) -> bool:
        return n > 0 and n % cls.block_size == 0

    @classmethod
    def check_row_length(cls, n: int) -> None:
        if not cls.can_hold(n):
            raise ShapeError(
                f"{cls.name} stores rows in blocks of {cls.block_size} weights; "
                f"a row of {n} weights does not fit (llama.cpp falls back to another type for such rows; "
                "the method option fallback=true does the same)"
            )

    # ------------------------------------------------------------------ quantize
    @classmethod
    def quantize_rows(cls, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Quantize ``x`` (rows × n) to its GGUF bytes (rows × row_bytes, uint8).

        ``imatrix`` (n,) is llama.cpp's per-column importance; ``None`` selects the reference
        (no-imatrix) path, exactly as ``llama_model_quantize`` does without an imatrix.
        """
        x = np.ascontiguousarray(np.asarray(x, dtype=F32))
        if x.ndim != 2:
            raise ShapeError(f"{cls.name}: expected a 2-D matrix, got shape {x.shape}")
        rows, n = x.shape
        cls.check_row_length(n)
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(np.asarray(imatrix, dtype=F32).reshape(-1))
            if qw.shape[0] != n:
                raise ShapeError(f"{cls.name}: importance of length {qw.shape[0]} for rows of {n} weights")
            if not np.all(np.isfinite(qw)):
                raise ConfigError(f"{cls.name}: the importance matrix contains non-finite values")
        elif not cls.reference_path:
            raise ConfigError(
                f"{cls.name} needs an importance matrix (llama.cpp refuses it without one: "
                "the result is garbage); calibrate, pass --imatrix, or force it"
            )
        nb = n // cls.block_size
        out = np.empty((rows, nb * cls.type_size), dtype=np.uint8)
        step = max(1, _CHUNK_WEIGHTS // n)
        qw3 = None if qw is None else qw.reshape(1, nb, cls.block_size)
        for r0 in range(0, rows, step):
            chunk = x[r0 : r0 + step].reshape(-1, nb, cls.block_size)
            out[r0 : r0 + step] = cls._quantize(chunk, qw3).reshape(chunk.shape[0], -1)
        return out

    @classmethod
    @abstractmethod
    def _quantize(cls, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        """(R, nb, block_size) floats (+ (1, nb, block_size) importance) → (R, nb, type_size) bytes."""

    # ------------------------------------------------------------------ dequantize
    @classmethod
    def dequantize_rows(cls, data: np.ndarray, n: int) -> np.ndarray:
        """GGUF bytes (rows × row_bytes) → float32 (rows × n)."""
        data = np.ascontiguousarray(np.asarray(data, dtype=np.uint8))
        cls.check_row_length(n)
        rb = cls.row_bytes(n)
        if data.size % rb:
            raise CorruptFileError(f"{cls.name}: {data.size} bytes is not a whole number of {rb}-byte rows")
        blocks = data.reshape(-1, cls.type_size)
        return cls.dequantize_blocks(blocks).reshape(-1, n)

    @classmethod
    @abstractmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(N, type_size) bytes → (N, block_size) float32, identical to gguf-py's dequantizer."""


def ggml_type(name: str) -> type[GGMLType]:
    """The registered GGML type ``name`` (any case: ``q4_k``, ``Q4_K``)."""
    _load_types()
    cls = _TYPES.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown GGML type {name!r}; known types: {', '.join(type_names())}")
    return cls


def type_names() -> list[str]:
    _load_types()
    return sorted(c.name for c in _TYPES.values())


def _load_types() -> None:
    from q2lab.quant.ggml import iq2, iq3, kquants, legacy  # noqa: F401


# ---------------------------------------------------------------------- packing helpers
def position_major(x: np.ndarray, size: int) -> np.ndarray:
    """Groups of ``size`` consecutive weights → (size, G) contiguous (see :mod:`.fp`)."""
    return np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1, size).T)


def group_major(t: np.ndarray) -> np.ndarray:
    """Inverse of :func:`position_major`: (size, G) → (G, size)."""
    return np.ascontiguousarray(t.T)


def split(blocks: np.ndarray, layout: tuple[tuple[str, int], ...]) -> dict[str, np.ndarray]:
    """Byte components of (N, type_size) blocks by name."""
    out, pos = {}, 0
    for name, nbytes in layout:
        out[name] = blocks[:, pos : pos + nbytes]
        pos += nbytes
    return out


def join(
    parts: dict[str, np.ndarray], layout: tuple[tuple[str, int], ...], shape: tuple[int, ...]
) -> np.ndarray:
    """Concatenate named components (each (..., nbytes) uint8 or a view) into blocks."""
    pieces = [np.asarray(parts[name]).reshape(*shape, nbytes).view(np.uint8) for name, nbytes in layout]
    return np.concatenate(pieces, axis=-1)


def half(blocks: np.ndarray) -> np.ndarray:
    """A 2-byte fp16 component → float32 column (N, 1)."""
    return np.ascontiguousarray(blocks).view(np.float16).astype(F32)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 values (...,) → their fp16 bytes (..., 2)."""
    return np.asarray(v, dtype=F32).astype(np.float16)[..., None].view(np.uint8)
