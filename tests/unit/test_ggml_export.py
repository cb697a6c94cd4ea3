"""GGUF export, llama.cpp file-type recipes and imatrix files, against llama.cpp itself.

The oracle is ``llama_model_quantize`` (llama-cpp-python) run on our own float GGUF of the same
model: every tensor's type and bytes must equal ours.  Tests that need it skip with a message
where llama-cpp-python is not installed; recipe, imatrix and error tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest

from q2lab.errors import ConfigError, CorruptFileError
from q2lab.export.gguf import export_gguf, gguf_tensors, load_into
from q2lab.quant.ggml import llamacpp
from q2lab.quant.ggml.imatrix import Imatrix, read_imatrix, write_imatrix
from q2lab.quant.ggml.recipes import plan_file
from tests.oracles import needs_llamacpp
from tests.tiny import make_tiny_model

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def imatrix(tiny256) -> Imatrix:
    rng = np.random.default_rng(0)
    tens = [t for t in gguf_tensors(tiny256.model) if t.module]
    values = {t.name: (rng.random(t.data.shape[-1]) ** 2 * 3).astype(np.float32) for t in tens}
    return Imatrix(values, {k: 100 for k in values}, datasets=["test"], chunk_count=4, chunk_size=25)


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _same_file_tensors(ref, ours) -> list[str]:
    from q2lab.export.gguf import differing_tensors

    return differing_tensors(ref, ours)


@needs_llamacpp
@pytest.mark.parametrize(
    "file_type,with_imatrix",
    [
        ("Q2_K", False),
        ("Q3_K_S", False),
        ("Q3_K_M", False),
        ("Q3_K_L", False),
        ("Q4_K_S", False),
        ("Q4_K_M", False),
        ("Q5_K_S", False),
        ("Q5_K_M", False),
        ("Q6_K", False),
        ("Q8_0", False),
        ("F16", False),
        ("Q2_K", True),
        ("Q4_K_M", True),
        ("IQ2_XXS", True),
        ("IQ2_S", True),  # IQ2_XS with IQ3_S for attention V/output and the first ffn_down
        ("IQ2_M", True),
    ],
)
def test_file_equals_llamacpp(tiny256, f32_file, imatrix, tmp_path, file_type, with_imatrix) -> None:
    """Same tensor types and the same bytes as llama_model_quantize on our float GGUF."""
    im = imatrix if with_imatrix else None
    ref = tmp_path / "ref.gguf"
    llamacpp.quantize_file(f32_file, ref, file_type, imatrix=im.values if im else None, nthread=1)
    report = export_gguf(tiny256, tmp_path / "ours.gguf", file_type, imatrix=im)
    assert _same_file_tensors(ref, tmp_path / "ours.gguf") == []
    size = sum(int(t.n_bytes) for t in _tensors(ref).values()) * 8
    numel = sum(int(t.n_elements) for t in _tensors(ref).values())
    assert report["bpw"] == pytest.approx(size / numel, abs=1e-4)


@needs_llamacpp
def test_exported_file_runs_in_llamacpp(tmp_path) -> None:
    """llama.cpp runs our files: F32 logits equal the model's; Q4_K_M ones are those of our weights."""
    import torch

    from q2lab.quant.ggml.llamacpp import logits

    lm = make_tiny_model(hidden_size=256, intermediate_size=512, num_hidden_layers=2, seed=3)
    tokens = lm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    with torch.no_grad():
        float_logits = lm.model(torch.tensor([tokens])).logits[0].numpy()
    export_gguf(lm, tmp_path / "f.gguf", "F32")
    assert np.abs(logits(tmp_path / "f.gguf", tokens) - float_logits).max() < 1e-3
    export_gguf(lm, tmp_path / "q.gguf", "Q4_K_M")
    theirs = logits(tmp_path / "q.gguf", tokens)
    load_into(lm, tmp_path / "q.gguf")
    with torch.no_grad():
        ours = lm.model(torch.tensor([tokens])).logits[0].numpy()
    # llama.cpp also rounds activations to 8 bits in quantized matmuls: compare against the
    # quantization's own effect rather than demanding equality
    assert np.abs(ours - theirs).max() < 0.2 * np.abs(ours - float_logits).max()


@needs_llamacpp
def test_gemma3_export_runs_in_llamacpp(tmp_path) -> None:
    """A Gemma-3-shaped model: llama.cpp's gemma3 graph on our file gives the model's logits.

    51 tokens over a sliding window of 8 (local/global layers, two rope bases), norms away from
    zero so the stored ``1 + w`` matters, no Q/K permutation; the Q4_K_M file equals llama.cpp's
    quantization of our F32 file, and ``load_into`` reads the quantized weights back.
    """
    import torch

    from q2lab.export.gguf import differing_tensors
    from q2lab.quant.ggml.llamacpp import logits

    lm = make_tiny_model("gemma3", hidden_size=256, intermediate_size=512, num_hidden_layers=2, seed=3)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    tokens = lm.tokenizer("The quick brown fox jumps over the lazy dog and runs far away.")["input_ids"]
    assert len(tokens) > 3 * lm.model.config.sliding_window
    with torch.no_grad():
        float_logits = lm.model(torch.tensor([tokens])).logits[0].numpy()
    f32 = tmp_path / "f.gguf"
    export_gguf(lm, f32, "F32")
    names = set(_tensors(f32))
    gemma_norms = ("attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
    assert {f"blk.1.{n}.weight" for n in gemma_norms} <= names
    assert np.abs(logits(f32, tokens) - float_logits).max() < 1e-3
    ref = tmp_path / "ref.gguf"
    llamacpp.quantize_file(f32, ref, "Q4_K_M", nthread=1)
    export_gguf(lm, tmp_path / "q.gguf", "Q4_K_M")
    assert differing_tensors(ref, tmp_path / "q.gguf") == []
    theirs = logits(tmp_path / "q.gguf", tokens)
    load_into(lm, tmp_path / "q.gguf")
    with torch.no_grad():
        ours = lm.model(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 0.2 * np.abs(ours - float_logits).max()


def test_float_export_round_trips(tiny256, f32_file) -> None:
    """Reading our F32 file back (Q/K permutation undone) gives the model's weights exactly."""
    import copy

    import torch

    model = copy.deepcopy(tiny256)
    for p in model.model.parameters():
        p.data.zero_()
    load_into(model, f32_file)
    for (k, a), b in zip(tiny256.model.state_dict().items(), model.model.state_dict().values()):
        assert torch.equal(a, b), k
    meta = gguf.GGUFReader(str(f32_file)).fields
    assert meta["llama.block_count"].contents() == 2
    assert len(meta["tokenizer.ggml.tokens"].contents()) == tiny256.model.config.vocab_size


def test_recipe_on_smollm2_shapes_reproduces_the_fallbacks() -> None:
    """SmolLM2-135M's 576-wide rows: llama.cpp's "Q2_K" is 75% Q4_0, "IQ2_XXS" 72% IQ4_NL (FACTS)."""
    tensors = [("token_embd.weight", (49152, 576)), ("output_norm.weight", (576,))]
    for i in range(30):
        tensors += [
            (f"blk.{i}.attn_k.weight", (192, 576)),
            (f"blk.{i}.attn_norm.weight", (576,)),
            (f"blk.{i}.attn_output.weight", (576, 576)),
            (f"blk.{i}.attn_q.weight", (576, 576)),
            (f"blk.{i}.attn_v.weight", (192, 576)),
            (f"blk.{i}.ffn_down.weight", (576, 1536)),
            (f"blk.{i}.ffn_gate.weight", (1536, 576)),
            (f"blk.{i}.ffn_norm.weight", (576,)),
            (f"blk.{i}.ffn_up.weight", (1536, 576)),
        ]
    q2k = plan_file("Q2_K", tensors, n_head=9, n_head_kv=3, n_layer=30)
    assert q2k.type_shares() == pytest.approx({"Q4_0": 0.75, "Q3_K": 0.25}, abs=0.01)
    assert q2k.bpw("linear") == pytest.approx(4.23, abs=0.01)
    iq = plan_file("IQ2_XXS", tensors, n_head=9, n_head_kv=3, n_layer=30, has_imatrix=True)
    shares = iq.type_shares()
    assert shares["IQ4_NL"] == pytest.approx(0.72, abs=0.01)
    assert shares["IQ2_XXS"] == pytest.approx(0.22, abs=0.01)
    assert iq.bpw("linear") == pytest.approx(3.91, abs=0.01)
    by_name = {t.name: t for t in iq.tensors}
    assert by_name["token_embd.weight"].type == "Q8_0"  # tied: quantized as the output
    assert "576 is not a multiple of 256" in by_name["blk.5.attn_q.weight"].why


def test_unknown_file_type_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown llama\.cpp file type"):
        plan_file("Q7_K", [], n_head=1, n_head_kv=1, n_layer=1)


def test_iq2s_and_iq2m_recipes_bump_to_iq3s() -> None:
    """llama.cpp's IQ2_S/IQ2_M: IQ3_S where IQ2_XXS/XS files use Q2_K, plus attention output."""
    tens = [("token_embd.weight", (512, 256))] + [
        (f"blk.{i}.{n}.weight", s)
        for i in range(8)
        for n, s in (("attn_output", (256, 256)), ("attn_v", (256, 256)), ("ffn_down", (256, 512)))
    ]
    for ft, default in (("IQ2_S", "IQ2_XS"), ("IQ2_M", "IQ2_S")):
        types = {t.name: t.type for t in plan_file(ft, tens, n_head=4, n_head_kv=2, n_layer=8).tensors}
        assert types["token_embd.weight"] == "Q5_K"  # tied: quantized as the output
        assert types["blk.0.ffn_down.weight"] == "IQ3_S" and types["blk.1.ffn_down.weight"] == default
        assert types["blk.3.attn_v.weight"] == types["blk.3.attn_output.weight"] == "IQ3_S"


def test_iq2_export_without_imatrix_is_refused_and_leaves_no_file(tiny256, tmp_path) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(ConfigError, match="needs an importance matrix"):
        export_gguf(tiny256, out, "IQ2_XXS")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_imatrix_files_round_trip(imatrix, tmp_path, suffix) -> None:
    path = write_imatrix(tmp_path / f"im{suffix}", imatrix)
    back = read_imatrix(path)
    assert back.values.keys() == imatrix.values.keys()
    for k, v in imatrix.values.items():
        np.testing.assert_allclose(back.values[k], v, rtol=1e-6)
    assert back.chunk_count == imatrix.chunk_count


def test_corrupt_inputs_are_clear_errors(f32_file, tmp_path) -> None:
    from q2lab.models.gguf_loader import read_metadata

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_file.read_bytes()[:5000])
    with pytest.raises(CorruptFileError):
        read_metadata(cut)
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x05\x00\x00\x00\xff\xff")
    with pytest.raises(CorruptFileError):
        read_imatrix(bad)
    with pytest.raises(CorruptFileError):
        read_imatrix(cut)
    from q2lab.export.gguf import tensor_index

    with pytest.raises(CorruptFileError, match="truncated"):
        tensor_index(cut)
    assert set(tensor_index(f32_file)) == set(_tensors(f32_file))


def test_ggml_quantized_model_exports_its_own_bytes(tmp_path) -> None:
    """A model quantized by a q2lab GGML method (e.g. a checkpoint) keeps its exact bytes in the GGUF."""
    from q2lab.quant.base import make_config
    from q2lab.quant.linear import QuantLinear
    from q2lab.quant.model import quantize_model

    lm = make_tiny_model(hidden_size=256, intermediate_size=512, num_hidden_layers=2, seed=4)
    expected = export_gguf(lm, tmp_path / "direct.gguf", "Q4_K_S")
    quantize_model(lm.model, "q4_k", make_config("q4_k", {}), None)
    assert any(isinstance(m, QuantLinear) for m in lm.model.modules())
    export_gguf(lm, tmp_path / "from-ckpt.gguf", "Q4_K_S")
    a, b = _tensors(tmp_path / "direct.gguf"), _tensors(tmp_path / "from-ckpt.gguf")
    for name, t in a.items():
        if t.tensor_type.name == "Q4_K":  # the q4_k linears: same bytes whether re-used or redone
            assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)), name
    assert [t.tensor_type for t in a.values()] == [t.tensor_type for t in b.values()]
    assert expected["bpw"] > 4.5


def test_cli_export_bad_inputs_are_one_line_errors_and_leave_no_file(f32_file, tmp_path, capsys) -> None:
    from q2lab.cli import main

    out = tmp_path / "out.gguf"
    assert main(["export", str(f32_file), "--type", "Q7_K", "--out", str(out)]) == 2
    assert "unknown GGUF file type" in capsys.readouterr().err
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_file.read_bytes()[:4096])
    assert main(["export", str(cut), "--type", "Q4_K_M", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("q2lab: error:") and err.count("\n") == 1
    assert main(["export", str(f32_file), "--format", "onnx", "--out", str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_imatrix_from_hessian_store_is_the_diagonal(tiny256, tiny_text_file, tmp_path) -> None:
    """--imatrix auto: every linear's importance is diag(XᵀX)/n of the shared store, by GGUF name."""
    import torch

    from q2lab.calib.store import CalibSpec, calibrate
    from q2lab.export.gguf import imatrix_names
    from q2lab.quant.ggml.imatrix import from_store

    store = calibrate(tiny256, CalibSpec(corpus=str(tiny_text_file), windows=4, ctx=16), root=tmp_path)
    names = imatrix_names(gguf_tensors(tiny256.model))
    im = from_store(store, names)
    assert len(im) == 2 * 7 and "blk.1.ffn_down.weight" in im.values
    assert names["output.weight"] == "lm_head"  # not in the store (block linears only): no imatrix entry
    for gname in im.values:
        h = store.hessian(names[gname])
        expected = (torch.diagonal(h.xtx) / h.n).to(torch.float32).numpy()
        np.testing.assert_allclose(im.values[gname], expected, rtol=1e-6, err_msg=gname)
        assert im.counts[gname] == h.n
    back = read_imatrix(write_imatrix(tmp_path / "auto.gguf", im))
    for gname, v in im.values.items():  # exact: llama-quantize reads back the very same importance
        assert np.array_equal(back.values[gname], v), gname


@needs_llamacpp
def test_qwen2_export_runs_in_llamacpp(tmp_path) -> None:
    """A Qwen2-shaped model (Q/K/V biases, NeoX rope, grouped KV heads): llama.cpp's qwen2 graph on
    our F32 file gives the model's logits, the Q4_K_M file equals llama.cpp's quantization of it,
    and ``load_into`` reads the biases back."""
    import torch

    from q2lab.export.gguf import differing_tensors
    from q2lab.quant.ggml.llamacpp import logits

    lm = make_tiny_model("qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=2, seed=3)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)  # the biases must matter for the check to bite
    tokens = lm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    with torch.no_grad():
        float_logits = lm.model(torch.tensor([tokens])).logits[0].numpy()
    f32 = tmp_path / "f.gguf"
    export_gguf(lm, f32, "F32")
    assert {f"blk.0.attn_{x}.bias" for x in "qkv"} <= set(_tensors(f32))
    assert np.abs(logits(f32, tokens) - float_logits).max() < 1e-3
    ref = tmp_path / "ref.gguf"
    llamacpp.quantize_file(f32, ref, "Q4_K_M", nthread=1)
    export_gguf(lm, tmp_path / "q.gguf", "Q4_K_M")
    assert differing_tensors(ref, tmp_path / "q.gguf") == []
    bias = lm.model.model.layers[1].self_attn.k_proj.bias.detach().clone()
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.k_proj.bias.zero_()
    load_into(lm, tmp_path / "q.gguf")
    assert torch.equal(lm.model.model.layers[1].self_attn.k_proj.bias, bias)  # F32 in the file
