"""Importance-matrix files between q2lab and llama.cpp itself, both directions.

The oracle is llama.cpp's own ``llama-quantize`` program (its file reader and normalisation,
compiled from the installed llama-cpp-python's source: ``tests/oracles/llama_tools.py``):

* a file q2lab writes (GGUF and legacy ``.dat``) is accepted by ``llama-quantize --imatrix`` and
  gives the same bytes as ``llama_model_quantize`` given that importance in memory;
* a file in llama.cpp's format that q2lab did not write (written here from llama.cpp's format
  description with gguf-py / ``struct``: uneven token counts, a zero count, an entry for a tensor
  the model lacks) gives the same bytes through ``q2lab``'s export as through ``llama-quantize``.

Both use IQ2_XXS (the importance is required and steers every block's lattice search) and
Q4_K_M (K-quants weight their scale search by it).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from q2lab.export.gguf import differing_tensors, export_gguf, gguf_tensors
from q2lab.quant.ggml import llamacpp
from q2lab.quant.ggml.imatrix import Imatrix, read_imatrix, write_imatrix

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.skipif(
    not llamacpp.available(),
    reason="llama-cpp-python is not installed (pip install 'q2lab[llamacpp]'): no llama.cpp oracle",
)
FILE_TYPES = ("IQ2_XXS", "Q4_K_M")


@pytest.fixture(scope="module")
def tool():
    from tests.oracles.llama_tools import quantize_tool

    return quantize_tool()


def _linear_names(model) -> dict[str, int]:
    return {t.name: int(t.data.shape[-1]) for t in gguf_tensors(model.model) if t.module}


def _importance(model, seed: int) -> Imatrix:
    """Σx² and token counts as a calibration would give them (uneven per tensor, skewed columns)."""
    rng = np.random.default_rng(seed)
    sums, counts, values = {}, {}, {}
    for i, (name, cols) in enumerate(sorted(_linear_names(model).items())):
        count = 37 + 101 * i
        sums[name] = (rng.gamma(0.7, 2.0, cols) * count).astype(np.float32)
        counts[name] = count
        values[name] = sums[name] / np.float32(count)  # llama-quantize's float32 normalisation
    return Imatrix(values, counts, sums, datasets=["q2lab-test"], chunk_count=5, chunk_size=64)


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_llama_quantize_accepts_q2lab_imatrix_files(
    tool, tiny256, f32_file, tmp_path, suffix, file_type
) -> None:
    from tests.oracles.llama_tools import run_quantize

    im = _importance(tiny256, seed=1)
    path = write_imatrix(tmp_path / f"q2lab{suffix}", im)
    via_file = tmp_path / "via-file.gguf"
    log = run_quantize(f32_file, via_file, file_type, imatrix=path)
    assert f"loaded {len(im)} importance matrix entries" in log
    in_memory = tmp_path / "in-memory.gguf"
    # the importance the file encodes, as q2lab reads it (GGUF: exactly im.values; .dat: Σ/ncall)
    values = read_imatrix(path).values
    if suffix == ".gguf":
        assert all(np.array_equal(values[k], v) for k, v in im.values.items())
    llamacpp.quantize_file(f32_file, in_memory, file_type, imatrix=values, nthread=1)
    assert differing_tensors(in_memory, via_file) == []
    ours = tmp_path / "q2lab.gguf"
    export_gguf(tiny256, ours, file_type, imatrix=read_imatrix(path))
    assert differing_tensors(via_file, ours) == []


def _write_llamacpp_gguf(path, entries: dict[str, tuple[np.ndarray, float]]) -> None:
    """An imatrix GGUF laid out as ``llama-imatrix`` writes one, without q2lab's writer."""
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["wiki.train.raw"])
    w.add_uint32("imatrix.chunk_count", 12)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, count) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32).reshape(1, -1))  # ne = [cols, n_mat]
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))  # ne = [1, n_mat]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_llamacpp_dat(path, entries: dict[str, tuple[np.ndarray, int]]) -> None:
    """The legacy format: count; per entry name, ncall, values (mean·ncall); chunks, dataset."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (vals, ncall) in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, vals.size))
            f.write(vals.astype("<f4").tobytes())
        f.write(struct.pack("<ii", 12, len(b"wiki.train.raw")) + b"wiki.train.raw")


def _foreign_entries(model, legacy: bool) -> dict:
    rng = np.random.default_rng(7)
    names = sorted(_linear_names(model).items())
    entries = {}
    for i, (name, cols) in enumerate(names):
        count = [512 * 12, 3, 1000, 777][i % 4]
        raw = rng.lognormal(0.0, 1.5, cols).astype(np.float32)
        entries[name] = (raw * np.float32(count if not legacy else 1.0), count if legacy else float(count))
    # a tensor the model does not have (another model's, or an MoE expert): both must ignore it
    entries["blk.9.ffn_up.weight"] = (np.ones(64, dtype=np.float32), 5)
    if not legacy:  # a tensor the calibration never reached: llama-quantize uses 1 for count 0
        first = names[0][0]
        entries[first] = (np.zeros(names[0][1], dtype=np.float32), 0.0)
    return entries


@pytest.mark.parametrize("legacy", [False, True], ids=["gguf", "dat"])
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_q2lab_reads_llamacpp_imatrix_like_llama_quantize(
    tool, tiny256, f32_file, tmp_path, legacy, file_type
) -> None:
    from tests.oracles.llama_tools import run_quantize

    path = tmp_path / ("foreign.dat" if legacy else "foreign.gguf")
    (_write_llamacpp_dat if legacy else _write_llamacpp_gguf)(path, _foreign_entries(tiny256, legacy))
    theirs = tmp_path / "llama-quantize.gguf"
    run_quantize(f32_file, theirs, file_type, imatrix=path)
    ours = tmp_path / "q2lab.gguf"
    export_gguf(tiny256, ours, file_type, imatrix=read_imatrix(path))
    assert differing_tensors(theirs, ours) == []
    # and the importance changed the bytes: without it, Q4_K_M differs (IQ2_XXS is refused)
    if file_type == "Q4_K_M":
        plain = tmp_path / "plain.gguf"
        export_gguf(tiny256, plain, file_type)
        assert differing_tensors(plain, ours) != []
