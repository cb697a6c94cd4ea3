"""`q2lab export --format compressed-tensors`: the packing against the compressed-tensors package's
own packer, and the checkpoint loaded by transformers (with compressed-tensors) against q2lab's
model — decoded weights bit-identical, logits equal."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from q2lab.errors import ConfigError
from q2lab.export.compressed_tensors import export_compressed_tensors, pack_int32
from q2lab.quant.base import make_config
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model
from tests.tiny import make_tiny_model

needs_ct = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors is not installed"
)
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2)


@needs_ct
@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_equals_the_formats_packer(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 77), generator=g)  # 77: words straddle rows' ends
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_text_file):
    from q2lab.calib.store import CalibSpec, calibrate

    spec = CalibSpec(corpus=str(tiny_text_file), windows=4, ctx=32)
    return calibrate(make_tiny_model("llama", **SHAPE), spec, root=tmp_path_factory.mktemp("ct-h"))


def _load(path, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def _quantized(method: str, options: dict, store=None):
    lm = make_tiny_model("llama", **SHAPE)
    quantize_model(lm.model, method, make_config(method, options), store)
    return lm


CASES = {
    "rtn-3b-g64-sym": ("rtn", {"bits": 3, "group_size": 64, "symmetric": True}),
    "rtn-4b-g128-asym": ("rtn", {"bits": 4, "group_size": 128}),
    "rtn-2b-row-asym": ("rtn", {"bits": 2, "group_size": None}),
    "gptq-3b-static-groups": ("gptq", {"bits": 3, "group_size": 64, "static_groups": True}),
    "mixed-gptq": (
        "mixed",
        {
            "base": {"method": "gptq", "bits": 4, "group_size": 64, "act_order": False, "symmetric": True},
            "rules": [
                # per-row scales: act order needs nothing special
                {
                    "match": r"mlp\.down_proj",
                    **{"method": "gptq", "bits": 8, "group_size": None, "symmetric": True},
                },
                {"match": r"self_attn\.v_proj", "method": "fp"},
            ],
        },
    ),
}


@needs_ct
@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_checkpoint_bit_exactly(case, tmp_path, store):
    method, options = CASES[case]
    lm = _quantized(method, options, store if method in ("mixed", "gptq") else None)
    ids = torch.randint(0, len(lm.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(ids).logits
    report = export_compressed_tensors(lm, tmp_path / "ct")
    groups = report["quantization_config"]["config_groups"]
    asymmetric = any(not g["weights"]["symmetric"] for g in groups.values())
    # transformers 5.25 + compressed-tensors 0.20.1: the default (compressed) path builds unpacked
    # zero-point placeholders and rejects the packed zero points the format specifies (and that
    # compressed-tensors' own compressor writes), which `dequantize=True` reads; but that path
    # decodes every dense layer with the first config group's scheme, so several groups load on
    # the default path only.
    modes = (True,) if asymmetric else (False,) if len(groups) > 1 else (True, False)
    assert not (asymmetric and len(groups) > 1)
    for dequantize in modes:
        model = _load(tmp_path / "ct", dequantize)
        with torch.no_grad():  # the compressed path decompresses on the first forward
            assert torch.equal(model(ids).logits, ref)
        for name, mod in lm.model.named_modules():
            if isinstance(mod, QuantLinear):
                got = model.get_submodule(name).weight
                assert torch.equal(got, mod.weight_dequantized(torch.float32)), name
    if method == "mixed":
        assert len(groups) == 2 and report["quantization_config"]["ignore"] == [
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.v_proj",
            "lm_head",
        ]


@pytest.mark.parametrize(
    ("method", "options", "error"),
    [
        ("quip#", {"bits": 2}, r"model\.layers\.0\.self_attn\.q_proj is quantized with 'quip#'"),
        ("q4_k", {}, "is quantized with 'q4_k'"),
        ("gptq", {"bits": 4, "group_size": 64}, "act-order groups"),
        ("rtn", {"bits": 4, "group_size": 96}, "self_attn.q_proj has 256 columns in groups of 96"),
        ("upq", {"bits": 2, "group_size": 64}, "quantized with 'upq'"),  # SEQ levels: half-integer zero
    ],
)
def test_what_the_format_cannot_express_is_one_line_and_writes_nothing(
    method, options, error, tmp_path, store
):
    lm = make_tiny_model("llama", **SHAPE)
    quantize_model(lm.model, method, make_config(method, options), store)
    with pytest.raises(ConfigError, match=error) as err:
        export_compressed_tensors(lm, tmp_path / "ct")
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_a_float_model_has_nothing_to_export(tmp_path):
    with pytest.raises(ConfigError, match="no quantized linear"):
        export_compressed_tensors(make_tiny_model("llama", **SHAPE), tmp_path / "ct")


@needs_ct
def test_cli_exports_a_checkpoint(tmp_path, capsys):
    import json

    from q2lab.cli import main
    from q2lab.export.checkpoint import save_checkpoint

    lm = _quantized("rtn", {"bits": 4, "group_size": 64, "symmetric": True})
    save_checkpoint(lm, tmp_path / "ckpt")
    out = tmp_path / "ct"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "compressed-tensors", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "compressed-tensors" and summary["quantized_linears"] == 14
    model = _load(out, dequantize=False)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm.model(ids).logits)
