"""``q2lab export --format hf-aqlm`` on the real model: SmolLM2-135M with its first decoder block
in AQLM 2×8 (the rest float, listed as not quantized), loaded by ``transformers`` with the
``aqlm`` package, gives q2lab's logits.  One block keeps the test inside CI's budget; the format
is the same for every block."""

from __future__ import annotations

import json

import pytest
import torch

from q2lab.export.hf_aqlm import export_hf_aqlm
from q2lab.models import load_model
from q2lab.quant import make_config
from q2lab.quant.model import quantize_model

pytestmark = pytest.mark.integration
aqlm = pytest.importorskip("aqlm")

SKIP = [r"layers\.([1-9]|[1-9][0-9])\."]  # blocks 1.. stay float


def test_smollm2_aqlm_export_loads_in_transformers(smollm2_store, tmp_path):
    numba = pytest.importorskip("numba")
    from aqlm import QuantizedLinear
    from transformers import AutoModelForCausalLM

    cand = load_model("smollm2-135m")
    cfg = make_config("aqlm", {"bits": 2, "rounds": 1, "tune_steps": 0, "beam": 4, "kmeans_iters": 8})
    report = quantize_model(cand.model, "aqlm", cfg, smollm2_store, skip=SKIP)
    assert len(report.layers) == 7
    summary = export_hf_aqlm(cand, tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert (qc["num_codebooks"], qc["nbits_per_codebook"], qc["in_group_size"]) == (2, 8, 8)
    assert "model.layers.1.mlp.down_proj.weight" in qc["linear_weights_not_to_quantize"]
    assert summary["quantized_linears"] == 7
    ids = cand.tokenizer("The capital of France is Paris, and the capital of Poland is", return_tensors="pt")[
        "input_ids"
    ]
    before = numba.get_num_threads()
    numba.set_num_threads(1)  # aqlm 1.1.7's 2^8 CPU kernel races with more threads (README)
    try:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        assert sum(isinstance(m, QuantizedLinear) for m in hf.modules()) == 7
        with torch.no_grad():
            got, want = hf(ids).logits, cand.model(ids).logits
    finally:
        numba.set_num_threads(before)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())
