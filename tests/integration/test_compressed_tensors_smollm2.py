"""``q2lab export --format compressed-tensors`` on the real model: SmolLM2-135M with its first two
decoder blocks in GPTQ 4-bit with act order and static groups of 64 (576 and 1536 columns: 64
divides both, 128 does not divide 576) and the rest float (listed in ``ignore``), loaded by
``transformers`` with the compressed-tensors package on its default (compressed) path: the
decompressed weights are q2lab's decoded weights bit for bit and the logits are equal.  Two blocks
keep the test inside CI's budget; the format is the same for every block."""

from __future__ import annotations

import json

import pytest
import torch

from q2lab.export.compressed_tensors import export_compressed_tensors
from q2lab.models import load_model
from q2lab.quant import make_config
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model

pytestmark = pytest.mark.integration
pytest.importorskip("compressed_tensors")

SKIP = [r"layers\.([2-9]|[1-9][0-9])\."]  # blocks 2.. stay float


def test_smollm2_gptq_export_loads_in_transformers(smollm2_store, tmp_path):
    from transformers import AutoModelForCausalLM

    cand = load_model("smollm2-135m")
    cfg = make_config("gptq", {"bits": 4, "group_size": 64, "symmetric": True, "static_groups": True})
    quantize_model(cand.model, "gptq", cfg, smollm2_store, skip=SKIP)
    summary = export_compressed_tensors(cand, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and list(qc["config_groups"]) == ["group_0"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert summary["quantized_linears"] == 2 * 7
    assert len(qc["ignore"]) == 28 * 7 + 1 and qc["ignore"][-1] == "lm_head"  # float blocks; tied head
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    text = "The capital of France is Paris, and the capital of Poland is"
    ids = cand.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the compressed path decompresses on the first forward
        assert torch.equal(hf(ids).logits, cand.model(ids).logits)
    for name, mod in cand.model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(hf.get_submodule(name).weight, mod.weight_dequantized(torch.float32)), name
