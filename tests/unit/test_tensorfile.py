"""q2lab.utils.tensorfile against the safetensors package, both ways, and the chunked paths
(dtype-converting reads, banded XᵀX accumulation) against their one-shot equivalents."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from q2lab.calib import hessian
from q2lab.errors import CorruptFileError, ModelError
from q2lab.utils import tensorfile
from q2lab.utils.tensorfile import SafetensorsFiles, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(7, 5, generator=g),
        "b.f16": torch.randn(3, 4, 2, generator=g).half(),
        "c.bf16": torch.randn(9, generator=g).bfloat16(),
        "d.i64": torch.arange(-5, 6),
        "e.u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.zeros(0, 4),
    }


def test_our_files_load_in_safetensors_and_theirs_in_ours(tmp_path):
    ts = _tensors()
    write_safetensors(tmp_path / "ours.safetensors", ts, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert back.keys() == ts.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in ts.items())
    save_file(ts, str(tmp_path / "theirs.safetensors"))
    files = SafetensorsFiles(tmp_path / "theirs.safetensors")
    for k, v in ts.items():
        got = files.read(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_converting_reads_cross_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile, "_CHUNK", 10)  # 5 float16 values per read
    x = torch.randn(37, 3).half()
    write_safetensors(tmp_path / "x.safetensors", {"x": x})
    got = SafetensorsFiles(tmp_path / "x.safetensors").read("x", torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, x.float())
    assert torch.equal(SafetensorsFiles(tmp_path / "x.safetensors").read("x"), x)


def test_bad_files_are_clear_errors(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"x": torch.ones(100)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CorruptFileError, match="truncated"):
        SafetensorsFiles(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CorruptFileError, match="not a readable safetensors file"):
        SafetensorsFiles(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="no tensor y"):
        SafetensorsFiles(tmp_path / "x.safetensors").read("y")


def test_banded_hessian_equals_the_whole_product(monkeypatch):
    x = torch.randn(3, 40, 24, dtype=torch.float64)
    want = hessian.HessianAccumulator(24)
    for batch in x:
        want.add(batch)
    monkeypatch.setattr(hessian, "_PRODUCT_ELEMENTS", 24 * 5)  # bands of 5 columns
    got = hessian.HessianAccumulator(24)
    for batch in x:
        got.add(batch)
    assert got.n == want.n == 120
    torch.testing.assert_close(got.xtx, want.xtx, rtol=1e-6, atol=1e-5)
    exact = sum(b.T @ b for b in x)
    torch.testing.assert_close(got.xtx, exact, rtol=1e-5, atol=1e-4)
