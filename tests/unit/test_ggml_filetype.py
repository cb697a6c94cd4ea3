"""The ``llamacpp`` method: a llama.cpp file type's per-tensor plan applied to the linears in place.

Oracles: llama.cpp itself (``llama_model_quantize`` on our float GGUF with the same importance
matrix: every linear's type and bytes must equal the file's) where llama-cpp-python is
installed, and otherwise q2lab's GGUF export, whose plan is proven against llama.cpp in
test_ggml_export.py and which reads the weights a different way (from the exported tensors,
not the module tree).
"""

from __future__ import annotations

import numpy as np
import pytest

from q2lab.errors import ConfigError
from q2lab.export.gguf import export_gguf, gguf_tensors, imatrix_names
from q2lab.quant.base import make_config
from q2lab.quant.ggml import llamacpp
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model
from tests.tiny import checkpoint_logits, make_tiny_model

gguf = pytest.importorskip("gguf")


def _model(arch: str = "llama"):
    """Rows of 288 (32-blocks only: K/IQ2 types fall back) and 512 (256-blocks fit), 8 layers so
    that the first-eighth and use_more_bits rules pick different layers."""
    extra = {"layer_types": ["sliding_attention", "full_attention"] * 4} if arch == "gemma3" else {}
    return make_tiny_model(arch, hidden_size=288, intermediate_size=512, num_hidden_layers=8, seed=5, **extra)


@pytest.fixture(scope="module")
def store(tiny_text_file, tmp_path_factory):
    from q2lab.calib.store import CalibSpec, calibrate

    spec = CalibSpec(corpus=str(tiny_text_file), windows=4, ctx=16)
    return calibrate(_model(), spec, root=tmp_path_factory.mktemp("hess"))


def _held(lm) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name → (type, bytes in GGUF row order) of every quantized linear."""
    return {t.name: (t.blocks_type, t.blocks) for t in gguf_tensors(lm.model) if t.blocks is not None}


@pytest.mark.parametrize(
    "file_type,imatrix",
    [("Q2_K", False), ("Q3_K_M", False), ("Q4_K_M", False), ("Q5_K_M", True), ("IQ2_M", True)],
)
def test_types_and_bpw_follow_the_export_plan(store, tmp_path, file_type, imatrix) -> None:
    """Each linear gets the type q2lab's GGUF export of the same file type gives it, and the
    report's bpw and format shares are those of the file's linears."""
    from q2lab.quant.ggml.imatrix import from_store

    lm = _model()
    im = from_store(store, imatrix_names(gguf_tensors(lm.model))) if imatrix else None
    plan = export_gguf(lm, tmp_path / "ref.gguf", file_type, imatrix=im)
    expected = {
        t["name"]: t["type"] for t in plan["tensors"] if t["name"].startswith("blk.") and len(t["shape"]) == 2
    }
    cfg = make_config("llamacpp", {"file_type": file_type, "imatrix": imatrix})
    report = quantize_model(lm.model, "llamacpp", cfg, store)
    assert {name: typ for name, (typ, _) in _held(lm).items()} == expected
    assert report.bpw == pytest.approx(plan["bpw_linear"], abs=1e-4)
    assert report.formats() == pytest.approx(plan["linear_types"], abs=1e-4)
    assert len(set(expected.values())) >= 2  # a real mix, not one type everywhere


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bytes_equal_the_exported_file(tmp_path, arch) -> None:
    """Bytes too, not just types: what is quantized in place is what the export writes (Gemma 3
    has its own tensor names and no Q/K row permutation)."""
    lm = _model(arch)
    export_gguf(lm, tmp_path / "ref.gguf", "Q4_K_M")
    quantize_model(lm.model, "llamacpp", make_config("llamacpp", {"file_type": "Q4_K_M"}), None)
    ref = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "ref.gguf")).tensors}
    held = _held(lm)
    assert len(held) == 8 * 7
    for name, (_, blocks) in held.items():
        assert np.array_equal(blocks.reshape(-1), ref[name].reshape(-1)), name


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed: no llama.cpp oracle")
@pytest.mark.parametrize("file_type", ["Q2_K", "Q4_K_M", "IQ2_M"])
def test_in_place_file_type_equals_llamacpp(store, tmp_path, file_type) -> None:
    """llama_model_quantize on the float GGUF, with the store's importance matrix: same type and
    same bytes for every linear."""
    from q2lab.quant.ggml.imatrix import from_store

    lm = _model()
    f32 = tmp_path / "f32.gguf"
    export_gguf(lm, f32, "F32")
    im = from_store(store, imatrix_names(gguf_tensors(lm.model)))
    ref = tmp_path / "ref.gguf"
    llamacpp.quantize_file(f32, ref, file_type, imatrix=im.values, nthread=1)
    theirs = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    cfg = make_config("llamacpp", {"file_type": file_type, "imatrix": True})
    quantize_model(lm.model, "llamacpp", cfg, store)
    held = _held(lm)
    assert len(held) == 8 * 7
    for name, (typ, blocks) in held.items():
        assert theirs[name].tensor_type.name == typ, name
        assert np.array_equal(blocks.reshape(-1), np.asarray(theirs[name].data).reshape(-1)), name


def test_checkpoint_of_a_mixed_model_reloads_bit_identically(tmp_path) -> None:
    """Every linear carries its own GGML method, so a saved mixed model decodes without the recipe."""
    import torch

    lm = _model()
    report = quantize_model(lm.model, "llamacpp", make_config("llamacpp", {"file_type": "Q3_K_M"}), None)
    methods = {m.qtensor.method for m in lm.model.modules() if isinstance(m, QuantLinear)}
    # 288-wide rows: Q3_K → Q4_0, attention V Q5_K/Q4_K → Q5_1/Q5_0; ffn_down (512) keeps Q4_K
    assert methods == {"q4_0", "q5_1", "q5_0", "q4_k"}
    before, after = checkpoint_logits(lm, report, tmp_path / "ckpt")
    assert torch.equal(before, after)


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="needs file_type"):
        make_config("llamacpp", {})
    with pytest.raises(ConfigError, match="Q7_K"):
        make_config("llamacpp", {"file_type": "Q7_K"})
    with pytest.raises(ConfigError, match="importance matrix"):
        make_config("llamacpp", {"file_type": "IQ2_XXS"})
    with pytest.raises(ConfigError, match="4-bit codes"):
        make_config("llamacpp", {"file_type": "Q4_K_M", "bits": 2})
    assert make_config("llamacpp", {"file_type": "q4_k_m"}).bits == 4


def test_imatrix_without_calibration_is_a_clear_error() -> None:
    lm = _model()
    with pytest.raises(ConfigError, match="needs calibration Hessians"):
        quantize_model(
            lm.model, "llamacpp", make_config("llamacpp", {"file_type": "Q2_K", "imatrix": True}), None
        )
