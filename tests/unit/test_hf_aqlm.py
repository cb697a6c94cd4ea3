"""``q2lab export --format hf-aqlm``: the oracle is the ``aqlm`` package itself, through
``transformers``' own AQLM loader — the exported folder must load with
``AutoModelForCausalLM.from_pretrained`` and give q2lab's logits."""

from __future__ import annotations

import json

import pytest
import torch

from q2lab.calib.store import CalibSpec, calibrate
from q2lab.errors import ConfigError
from q2lab.export.checkpoint import save_checkpoint
from q2lab.export.hf_aqlm import export_hf_aqlm, hf_codes
from q2lab.quant.base import make_config
from q2lab.quant.model import quantize_model
from tests.tiny import TINY_TEXT, make_tiny_model

aqlm = pytest.importorskip("aqlm")


@pytest.fixture()
def one_numba_thread():
    """aqlm 1.1.7's CPU kernel for 2^8-entry codebooks accumulates into one output vector from a
    parallel loop over input groups: with more than one numba thread its sums race (measured
    max |Δlogit| 0.18-0.22 on the tiny model vs 7e-7 with one thread).  The format is what is
    under test here, so the kernel runs single-threaded."""
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def _quantized(tmp_path, opts, tie=False):
    corpus = tmp_path / "calib.txt"
    corpus.write_text(TINY_TEXT * 30, encoding="utf-8")
    lm = make_tiny_model(
        "llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1, tie_word_embeddings=tie
    )
    store = calibrate(lm, CalibSpec(corpus=str(corpus), windows=4, ctx=32, seed=0), root=tmp_path / "h")
    quantize_model(lm.model, "aqlm", make_config("aqlm", {"rounds": 1, "tune_steps": 5, **opts}), store)
    return lm, store


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(ids).logits


@pytest.mark.parametrize(
    ("opts", "tie"),
    [
        ({}, True),  # 2×8: int8 codes (values ≥ 128 wrap), aqlm's numba LUT kernel; tied lm_head
        ({"bits": 3, "group": 4, "codebooks": 1, "codebook_bits": 12}, False),  # int16 codes, dequant path
    ],
)
def test_transformers_loads_the_export_and_gives_our_logits(tmp_path, one_numba_thread, opts, tie):
    from aqlm import QuantizedLinear

    lm, _ = _quantized(tmp_path, opts, tie)
    summary = export_hf_aqlm(lm, tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    m = opts.get("codebooks", 2)
    assert qc["quant_method"] == "aqlm" and qc["num_codebooks"] == m
    assert qc["nbits_per_codebook"] == opts.get("codebook_bits", 8)
    assert qc["in_group_size"] == opts.get("group", 8) and qc["out_group_size"] == 1
    assert "lm_head.weight" in qc["linear_weights_not_to_quantize"]
    assert summary["quantized_linears"] == 7 and summary["float_linears"] == 1
    ids = torch.randint(0, len(lm.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    model, got = _hf_logits(tmp_path / "hf", ids)
    assert sum(isinstance(mod, QuantizedLinear) for mod in model.modules()) == 7
    assert not isinstance(model.lm_head, QuantizedLinear)
    with torch.no_grad():
        want = lm.model(ids).logits
        one = model(ids[:1, :4]).logits  # batch 1 of ≤ 6 tokens takes aqlm's gemv kernel
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (one - want[:1, :4]).abs().max() <= 1e-4 * want.abs().max()


def test_hf_codes_are_what_aqlm_unpacks():
    from aqlm.utils import unpack_int_data

    for bits in (2, 7, 8, 12, 16):
        codes = torch.randint(0, 1 << bits, (4096,), generator=torch.Generator().manual_seed(bits))
        codes[:2] = torch.tensor([0, (1 << bits) - 1])
        stored = hf_codes(codes, bits)
        assert stored.dtype == (torch.int8 if bits <= 8 else torch.int16)
        assert torch.equal(unpack_int_data(stored, bits), codes)


def test_cli_exports_a_checkpoint_folder(tmp_path, one_numba_thread):
    from q2lab.cli import main

    lm, _ = _quantized(tmp_path, {})
    ids = torch.randint(0, len(lm.tokenizer), (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lm.model(ids).logits
    save_checkpoint(lm, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf-aqlm", "--out", str(tmp_path / "hf")]) == 0
    _, got = _hf_logits(tmp_path / "hf", ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_models_the_format_cannot_hold_are_refused(tmp_path, capsys):
    from q2lab.cli import main

    gptq = make_tiny_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    quantize_model(gptq.model, "rtn", make_config("rtn", {"bits": 2}), None)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj is quantized with 'rtn'"):
        export_hf_aqlm(gptq, tmp_path / "a")
    plain = make_tiny_model("llama")
    with pytest.raises(ConfigError, match="no aqlm-quantized linear"):
        export_hf_aqlm(plain, tmp_path / "b")
    lm, _ = _quantized(tmp_path, {"rounds": 0}, False)
    for name, mod in lm.model.named_modules():  # one layer with other codebook settings
        if name.endswith("mlp.down_proj"):
            mod.meta["codebook_bits"] = 4
    with pytest.raises(ConfigError, match="down_proj has codebooks×bits/group 2×4/g8"):
        export_hf_aqlm(lm, tmp_path / "c")
    assert not any(p.name != "h" and p.name != "calib.txt" for p in tmp_path.iterdir()), "half-written"
    assert main(["export", "tiny-unknown", "--format", "onnx", "--out", str(tmp_path / "d")]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err
