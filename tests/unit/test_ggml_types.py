"""GGML types: bytes equal llama.cpp's C quantizers; decoding equals the gguf package's.

Oracles: llama.cpp's own ``ggml_quantize_chunk`` (through llama-cpp-python's libraries; these
tests skip with a message where it is not installed), the gguf package's dequantizers (always),
and gguf's bit-exact reference quantizers for the legacy types (always).
"""

from __future__ import annotations

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch

from q2lab.errors import ConfigError, ShapeError
from q2lab.quant.base import get_quantizer, make_config
from q2lab.quant.ggml import llamacpp
from q2lab.quant.ggml.types import ggml_type, type_names
from tests.oracles import needs_llamacpp

ALL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IQ2_TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]
LATTICE_TYPES = [*IQ2_TYPES, "IQ3_S"]  # the shared lattice search (iq2.py, iq3.py)


def hard_matrix(n: int, rows: int = 12, seed: int = 0) -> np.ndarray:
    """Rows that exercise the edge cases: zeros, partial zeros, tiny, outliers, ties, -0.0."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((max(rows, 10), n)) * 0.02).astype(np.float32)
    x[1] = 0.0
    x[2, : n // 3] = 0.0
    x[3] *= 1e-6
    x[4, ::17] *= 40.0
    x[5] = np.round(x[5] * 200) / 200  # many exact ties
    x[6, ::5] = -0.0
    x[7] = np.abs(x[7])  # all positive: min clamps to 0
    x[8] = -np.abs(x[8])
    x[9, 5] = 1.0  # one outlier in a row
    return x[:rows] if rows < 10 else x


def importance(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qw = (rng.random(n) ** 3 * 10).astype(np.float32)
    qw[::11] = 0.0
    return qw


def _n(name: str) -> int:
    return 512 if ggml_type(name).block_size == 256 else 96


@needs_llamacpp
@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_equal_llamacpp(name: str, with_imatrix: bool) -> None:
    t = ggml_type(name)
    n = _n(name)
    x = hard_matrix(n)
    qw = importance(n) if with_imatrix else None
    ours = t.quantize_rows(x, qw)
    ref = llamacpp.quantize_chunk(int(t.qtype), x, qw)
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad.size == 0, f"{name}: rows {bad.tolist()} differ from llama.cpp"


@needs_llamacpp
@pytest.mark.parametrize("name", LATTICE_TYPES)
def test_iq2_bytes_equal_llamacpp(name: str) -> None:
    """IQ2/IQ3_S with an importance matrix (and the reference paths): one search, bit for bit."""
    t = ggml_type(name)
    x = hard_matrix(512)
    x[10:] = np.random.default_rng(9).standard_t(4, (x.shape[0] - 10, 512)) * 0.02
    x[11, 32:64] = 0.0  # an all-zero sub-block mid-row: IQ3_S's C code shifts the later groups
    for qw in [importance(512)] + ([None] if t.reference_path else []):
        ours = t.quantize_rows(x, qw)
        bad = np.nonzero((ours != llamacpp.quantize_chunk(int(t.qtype), x, qw)).any(axis=1))[0]
        assert bad.size == 0, f"{name}: rows {bad.tolist()} differ from llama.cpp"


@pytest.mark.parametrize("name", LATTICE_TYPES)
def test_iq2_dequantize_equals_gguf_package(name: str) -> None:
    t = ggml_type(name)
    x = hard_matrix(256, seed=5)
    blocks = t.quantize_rows(x, importance(256))
    ours = t.dequantize_rows(blocks, 256)
    assert np.array_equal(ours.view(np.uint32), gq.dequantize(blocks, t.qtype).view(np.uint32))
    assert np.all(ours[1] == 0)
    x = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    err = t.dequantize_rows(t.quantize_rows(x, np.ones(256, np.float32)), 256) - x
    assert float(np.sqrt((err**2).mean())) < 0.6, "2-bit lattice error on unit Gaussians"


def test_iq2_codebook_is_the_published_grid() -> None:
    """The grid decodes to gguf's table and every searchable off-grid key has neighbours."""
    from q2lab.quant.ggml.iq2 import codebook

    for name, size in zip(LATTICE_TYPES, (256, 512, 1024, 512)):
        cb = codebook(name)
        assert cb.levels.shape == (size, cb.group)
        getattr(gq, name).init_grid()
        vals = np.array(getattr(gq, name).grid_map, np.float32)[cb.levels]
        assert np.array_equal(vals, getattr(gq, name).grid.reshape(-1, cb.group))
        off = cb.kmap < 0
        on_keys = np.nonzero(~off)[0]
        assert np.array_equal(np.sort(cb.kmap[on_keys]), np.arange(size))
        assert np.all(cb.neighbours[~off] == -1)


@pytest.mark.parametrize("name", ["iq2_xxs", "iq2_xs", "iq2_s"])
def test_iq2_without_importance_is_refused_unless_forced(name: str) -> None:
    q = get_quantizer(name)
    w = torch.from_numpy(hard_matrix(256, rows=4))
    with pytest.raises(ConfigError, match="needs an importance matrix"):
        q.quantize(w, None, make_config(name, {}))
    qt = q.quantize(w, None, make_config(name, {"force": True}))
    assert qt.tensors["blocks"].shape == (4, ggml_type(name).row_bytes(256))


@needs_llamacpp
@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q6_K", "IQ4_NL"])
def test_bytes_equal_llamacpp_on_wide_rows(name: str) -> None:
    """Several super-blocks per row and a per-row sigma²: a 1536-wide matrix."""
    x = hard_matrix(1536, rows=10, seed=3)
    t = ggml_type(name)
    for qw in (None, importance(1536, seed=4)):
        assert np.array_equal(t.quantize_rows(x, qw), llamacpp.quantize_chunk(int(t.qtype), x, qw))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_equals_gguf_package(name: str) -> None:
    t = ggml_type(name)
    n = _n(name)
    x = hard_matrix(n, seed=5)
    for qw in (None, importance(n)):
        blocks = t.quantize_rows(x, qw)
        ours = t.dequantize_rows(blocks, n)
        theirs = gq.dequantize(blocks, t.qtype)
        assert ours.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        assert np.all(ours[1] == 0), "a zero row must decode to zeros"


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_bytes_equal_gguf_reference_quantizer(name: str) -> None:
    """gguf-py's reference quantizers are bit-exact with ggml for these: an oracle that always runs."""
    t = ggml_type(name)
    x = hard_matrix(128, seed=6)
    assert np.array_equal(t.quantize_rows(x), gq.quantize(x, t.qtype))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_quantization_error_is_small(name: str) -> None:
    """A sanity floor the exactness tests cannot give: relative RMS error falls with bits."""
    t = ggml_type(name)
    n = _n(name)
    x = np.random.default_rng(7).standard_normal((8, n)).astype(np.float32)
    err = t.dequantize_rows(t.quantize_rows(x), n) - x
    rel = float(np.sqrt((err**2).mean() / (x**2).mean()))
    limit = {"Q2_K": 0.45, "Q3_K": 0.25}.get(name, 0.13)
    assert rel < limit, f"{name}: relative RMS error {rel:.3f}"


def test_registry_and_sizes() -> None:
    assert set(ALL_TYPES) <= set(type_names())
    for name in ALL_TYPES:
        t = ggml_type(name.lower())
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert sum(t.bit_counts(3, t.block_size * 2).values()) == 3 * 2 * t.type_size * 8
    with pytest.raises(ConfigError, match="unknown GGML type"):
        ggml_type("Q7_K")


def test_row_length_that_does_not_fit_is_a_clear_error() -> None:
    with pytest.raises(ShapeError, match=r"blocks of 256 weights.*576"):
        ggml_type("Q4_K").quantize_rows(np.zeros((2, 576), np.float32))
    with pytest.raises(ShapeError):
        ggml_type("Q8_0").quantize_rows(np.zeros((2, 40), np.float32))


@pytest.mark.parametrize("name", ["q4_k", "q8_0", "iq4_nl"])
def test_quantizer_stores_gguf_bytes_and_exact_bits(name: str) -> None:
    q = get_quantizer(name)
    cfg = make_config(name, {})
    w = torch.from_numpy(hard_matrix(256, rows=8))
    qt = q.quantize(w, None, cfg)
    t = ggml_type(name)
    assert qt.tensors["blocks"].dtype == torch.uint8
    assert np.array_equal(qt.tensors["blocks"].numpy(), t.quantize_rows(w.numpy()))
    assert qt.bits() == 8 * t.row_bytes(256) * 8
    assert qt.bpw() == pytest.approx(t.bits_per_weight())
    deq = qt.dequantize()
    assert torch.equal(deq, torch.from_numpy(gq.dequantize(qt.tensors["blocks"].numpy(), t.qtype)))


def test_quantize_many_equals_one_by_one() -> None:
    q = get_quantizer("q2_k")
    cfg = make_config("q2_k", {})
    ws = [torch.from_numpy(hard_matrix(256, rows=r, seed=r)) for r in (4, 12)]
    many = q.quantize_many(ws, None, cfg)
    for w, qt in zip(ws, many):
        assert torch.equal(qt.tensors["blocks"], q.quantize(w, None, cfg).tensors["blocks"])


def test_bits_are_fixed_by_the_type() -> None:
    with pytest.raises(ConfigError, match="q4_k stores 4-bit codes"):
        make_config("q4_k", {"bits": 3})


@pytest.mark.parametrize("name,fallback", [("q4_k", "Q5_0"), ("q2_k", "Q4_0"), ("q6_k", "Q8_0")])
def test_fallback_option_uses_llamacpps_32_block_type(name: str, fallback: str) -> None:
    """Rows of 576 (SmolLM2): an error by default, llama.cpp's fallback type with fallback=true."""
    q = get_quantizer(name)
    w = torch.from_numpy(hard_matrix(576, rows=4))
    with pytest.raises(ShapeError, match="fallback=true"):
        q.quantize(w, None, make_config(name, {}))
    qt = q.quantize(w, None, make_config(name, {"fallback": True}))
    assert qt.meta["ggml_type"] == fallback and qt.method == fallback.lower()
    assert np.array_equal(qt.tensors["blocks"].numpy(), ggml_type(fallback).quantize_rows(w.numpy()))
    assert torch.equal(
        qt.dequantize(),
        torch.from_numpy(ggml_type(fallback).dequantize_rows(qt.tensors["blocks"].numpy(), 576)),
    )


def test_kquant_study_config_is_valid(data_root) -> None:
    """examples/kquant-study.yaml parses and every cell's options validate for its GGML method."""
    from pathlib import Path

    from q2lab.study.config import load_study

    study = load_study(Path(__file__).resolve().parents[2] / "examples" / "kquant-study.yaml")
    methods = {c.method for c in study.cells}
    assert {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "iq2_xxs", "iq2_xs", "iq2_s"} <= methods
    for cell in study.cells:
        if cell.method != "fp":  # the float reference row is not a registered method
            make_config(cell.method, cell.options)
