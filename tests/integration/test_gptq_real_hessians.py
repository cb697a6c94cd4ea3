"""GPTQ against RTN on the packaged SmolLM2-135M's own Hessians (not a synthetic one).

For every block linear at 2 and 3 bits (128-weight groups; 4 bits, where the two grids differ
least, is left to the synthetic-Hessian unit tests to keep CI's budget), GPTQ's proxy loss
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) — the layer-output error it minimises, on the shared calibration
store — is below RTN's, both with RTN's default min–max grid and with the same Hessian-weighted
MSE clipping GPTQ uses, so the gain is the error feedback, not the clipping.
"""

from __future__ import annotations

import pytest
import torch

from q2lab.models.arch import find_decoder
from q2lab.quant import make_config
from q2lab.quant.base import get_quantizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(smollm2_store):
    return smollm2_store


def _linears(model):
    layout = find_decoder(model)
    for b in range(len(layout)):
        for name, module in layout.block_linears(b).items():
            yield layout.full_name(b, name), module.weight.detach().float()


def _proxy(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) in float32 (``q2lab.quant.model.proxy_rel`` uses float64; the
    margins here are ≥ 2×, far above float32's error, and this is 4× faster)."""
    e = w - deq
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_proxy_loss_below_rtn_on_every_linear(smollm2, store, bits) -> None:
    candidates = {
        "gptq": make_config("gptq", {"bits": bits, "group_size": 128}),
        "rtn": make_config("rtn", {"bits": bits, "group_size": 128}),
        "rtn-mse": make_config("rtn", {"bits": bits, "group_size": 128, "clip": "mse"}),
    }
    worse, ratios = [], []
    for name, weight in _linears(smollm2.model):
        h = store.hessian(name)
        hm = h.mean(torch.float32)
        loss = {}
        for label, cfg in candidates.items():
            q = get_quantizer(label.split("-")[0])
            qt = q.quantize(weight, h if q.uses_hessian(cfg) else None, cfg)
            loss[label] = _proxy(weight, q.dequantize(qt), hm)
        ratios.append(loss["gptq"] / loss["rtn-mse"])
        worse += [
            (name, label, loss["gptq"], v)
            for label, v in loss.items()
            if label != "gptq" and v <= loss["gptq"]
        ]
    assert len(ratios) == 30 * 7
    assert worse == [], worse[:10]
    median = sorted(ratios)[len(ratios) // 2]
    print(f"{bits}-bit: GPTQ/RTN(mse) proxy loss median {median:.3f}, max {max(ratios):.3f}")
