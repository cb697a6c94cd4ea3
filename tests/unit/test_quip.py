"""QuIP# against independent oracles: the dense-matrix formula of the decode, brute-force
nearest E8P12 points when H = I (no feedback), exact bit counts, row independence of the
stacked run, the on-the-fly layer vs the dense weight, and the model/checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from q2lab.calib.hessian import Hessian
from q2lab.codebooks import e8p
from q2lab.errors import ConfigError, ShapeError
from q2lab.quant import make_config
from q2lab.quant.base import get_quantizer
from q2lab.quant.ldlq import proxy_loss
from q2lab.quant.quip import QuipLinear, decode_rows
from q2lab.transforms.hadamard import hadamard_matrix, unpack_signs
from tests.unit.test_ldlq import correlated_hessian


def identity_hessian(n: int) -> Hessian:
    return Hessian(torch.eye(n, dtype=torch.float64) * 10, 10)


def rel_loss(w: torch.Tensor, q: torch.Tensor, hess: Hessian) -> float:
    h = hess.mean(torch.float32)
    return proxy_loss(w, q, h) / proxy_loss(w, torch.zeros_like(w), h)


@pytest.mark.parametrize("bits,code_bits", [(2, 16), (3, 24), (4, 32)])
def test_exact_bits_and_dense_decode_formula(bits, code_bits):
    m, n = 48, 96
    w = torch.randn(m, n)
    qt = get_quantizer("quip#").quantize(w, correlated_hessian(n), make_config("quip#", {"bits": bits}))
    assert qt.bits() == m * n // 8 * code_bits + m + n + 32
    assert qt.bpw() == pytest.approx(bits + (m + n + 32) / (m * n))
    # W = Uᵀ (s·C) V with U = (H_m/√m) diag(s_out), V = (H_n/√n) diag(s_in) as dense matrices
    s_out, s_in = unpack_signs(qt.tensors["s_out"], m), unpack_signs(qt.tensors["s_in"], n)
    u = hadamard_matrix(m).float() @ torch.diag(s_out)
    v = hadamard_matrix(n).float() @ torch.diag(s_in)
    dense = u.T @ decode_rows(qt) @ v
    assert torch.allclose(qt.dequantize(), dense, atol=1e-5)


def test_identity_hessian_rounds_each_vector_to_its_nearest_point():
    m, n = 16, 64
    w = torch.randn(m, n)
    cfg = make_config("quip#", {"bits": 2, "scale_grid": 1, "damp": 0.0})
    qt = get_quantizer("quip#").quantize(w, identity_hessian(n), cfg)
    s_out, s_in = unpack_signs(qt.tensors["s_out"], m), unpack_signs(qt.tensors["s_in"], n)
    u = hadamard_matrix(m).float() @ torch.diag(s_out)
    v = hadamard_matrix(n).float() @ torch.diag(s_in)
    wt = u @ w @ v.T
    scale = float(qt.tensors["scale"][0])
    assert scale == pytest.approx(float(wt.square().mean().sqrt()) / 1.04, rel=1e-5)
    brute = e8p.nearest_in((wt / scale).reshape(-1, 8), e8p.codebook()).reshape(m, n) * scale
    assert torch.allclose(decode_rows(qt), brute, atol=1e-5)


def test_error_falls_with_bits_and_feedback_helps():
    m, n = 64, 192
    hess = correlated_hessian(n)
    w = torch.randn(m, n)
    q = get_quantizer("quip#")
    rel = {
        b: rel_loss(w, q.quantize(w, hess, make_config("quip#", {"bits": b})).dequantize(), hess)
        for b in (2, 3, 4)
    }
    assert rel[2] > rel[3] > rel[4]
    assert rel[4] < 0.02
    # BlockLDLQ's feedback beats rounding the same incoherent matrix without it (H = I run)
    no_fb = q.quantize(w, identity_hessian(n), make_config("quip#", {"bits": 2})).dequantize()
    assert rel[2] < rel_loss(w, no_fb, hess)


def test_stacked_weights_equal_separate_runs():
    n = 64
    hess = correlated_hessian(n)
    ws = [torch.randn(32, n), torch.randn(16, n) * 3]
    cfg = make_config("quip#", {"bits": 2, "scale_grid": 1})
    q = get_quantizer("quip#")
    together = q.quantize_many(ws, hess, cfg)
    for w, qt in zip(ws, together):
        alone = q.quantize(w, hess, cfg)
        assert torch.equal(qt.tensors["codes"], alone.tensors["codes"])
        assert torch.equal(qt.dequantize(), alone.dequantize())


def test_on_the_fly_layer_matches_the_dense_weight():
    m, n = 40, 96
    w = torch.randn(m, n)
    qt = get_quantizer("quip#").quantize(w, correlated_hessian(n), make_config("quip#", {"bits": 3}))
    bias = torch.randn(m)
    x = torch.randn(2, 5, n)
    layer = QuipLinear(qt, bias, cache_weight=False)
    layer.chunk_rows = 16  # several chunks, the last one short
    ref = F.linear(x, qt.dequantize(), bias)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer._cached is None  # nothing materialized
    assert torch.allclose(QuipLinear(qt, bias)(x), ref, atol=1e-5)


def test_model_quantization_and_checkpoint_roundtrip(tmp_path, tiny_text_file):
    from q2lab.calib.store import CalibSpec, calibrate
    from q2lab.export.checkpoint import save_checkpoint
    from q2lab.models import load_model
    from q2lab.quant.model import quantize_model
    from tests.tiny import make_tiny_model

    lm = make_tiny_model("llama")
    store = calibrate(
        lm, CalibSpec(corpus=str(tiny_text_file), windows=4, ctx=32, seed=0), root=tmp_path / "h"
    )
    report = quantize_model(lm.model, "quip", make_config("quip#", {"bits": 2}), store)
    assert report.method == "quip#" and 2.0 < report.bpw < 2.1
    assert sum(isinstance(mod, QuipLinear) for mod in lm.model.modules()) == 14
    assert all(lr.proxy_rel is not None and lr.proxy_rel < 0.5 for lr in report.layers)
    x = torch.randint(0, len(lm.tokenizer), (1, 12))
    with torch.no_grad():
        before = lm.model(x).logits
    save_checkpoint(lm, tmp_path / "ck", report.to_dict())
    loaded = load_model(str(tmp_path / "ck"))
    assert sum(isinstance(mod, QuipLinear) for mod in loaded.model.modules()) == 14
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, before)


def test_clear_errors():
    q = get_quantizer("quip#")
    with pytest.raises(ConfigError):
        make_config("quip#", {"bits": 1})
    with pytest.raises(ConfigError):
        make_config("quip#", {"scale_grid": 0})
    with pytest.raises(ShapeError):
        q.quantize(torch.randn(8, 60), identity_hessian(60), make_config("quip#", {}))  # 60 % 8
    with pytest.raises(ShapeError):
        q.quantize(torch.randn(8, 184), identity_hessian(184), make_config("quip#", {}))  # no Hadamard
