"""The ``qtip`` method against oracles: with H ∝ I (no LDLQ feedback) it is exactly the trellis
quantizer applied to the RHT-rotated tiles; exact bpw; lower proxy loss than GPTQ at fewer
bits; a quantized tiny model reloads from a checkpoint bit-identically."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from q2lab.calib.hessian import Hessian
from q2lab.calib.store import CalibSpec, calibrate
from q2lab.errors import ConfigError, ShapeError
from q2lab.quant import get_quantizer, make_config
from q2lab.quant.ldlq import proxy_loss
from q2lab.quant.model import quantize_model
from q2lab.quant.qtip.codes import code_table
from q2lab.quant.qtip.viterbi import quantize_sequences
from q2lab.transforms.hadamard import RHT
from tests.tiny import TINY_TEXT, checkpoint_logits, make_tiny_model


def correlated_hessian(n: int, tokens: int = 2048, seed: int = 0) -> Hessian:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.2 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * torch.linspace(0.2, 3.0, n)
    return Hessian((x.T @ x).double(), tokens)


def test_identity_hessian_is_the_plain_trellis_quantizer_on_rht_tiles():
    m, n = 32, 64
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    cfg = make_config("qtip", {"L": 8, "code": "1mad", "tile_rows": 8, "tile_cols": 8, "damp": 0.0})
    qt = get_quantizer("qtip").quantize(w, Hessian(torch.eye(n, dtype=torch.float64) * 5, 5), cfg)
    # oracle: rotate, scale, cut into 8×8 tiles (row-major), trellis-quantize, undo
    rht = RHT.make(m, n, cfg.seed)
    wt = rht.weight(w)
    s = (wt.square().mean().sqrt() / cfg.scale_alpha).half().float()
    tiles = (wt / s).reshape(m // 8, 8, n // 8, 8).permute(2, 0, 1, 3).reshape(-1, 64)
    _, rec = quantize_sequences(tiles, code_table("1mad", 8), cfg.trellis, warmup=cfg.tb_warmup)
    expect = rht.unweight(rec.reshape(n // 8, m // 8, 8, 8).permute(1, 2, 0, 3).reshape(m, n) * s)
    assert torch.allclose(qt.dequantize(), expect, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_bpw_and_lower_proxy_loss_than_gptq(bits):
    m, n = 48, 96
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(bits))
    hess = correlated_hessian(n)
    h = hess.mean(torch.float64)
    qt = get_quantizer("qtip").quantize(w, hess, make_config("qtip", {"bits": bits, "L": bits + 8}))
    assert qt.bits() == m * n * bits + 16 + m + n  # codes (tail-biting) + fp16 scale + 2 sign vectors
    assert qt.bpw() == pytest.approx(bits + (16 + m + n) / (m * n))
    gptq = get_quantizer("gptq").quantize(w, hess, make_config("gptq", {"bits": bits, "group_size": None}))
    assert gptq.bpw() > qt.bpw()
    assert proxy_loss(w, qt.dequantize(), h) < proxy_loss(w, gptq.dequantize(), h)


def test_hyb_code_stores_and_counts_its_table():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    cfg = make_config("qtip", {"L": 8, "code": "hyb", "hyb_q": 5})
    qt = get_quantizer("qtip").quantize(w, correlated_hessian(32), cfg)
    assert qt.tensors["lut"].shape == (32, 2) and qt.bit_counts["lut"] == 32 * 2 * 16
    assert float(((qt.dequantize() - w) ** 2).mean()) < 0.2 * float((w**2).mean())


def test_bad_shapes_and_options_raise_clear_errors():
    q = get_quantizer("qtip")
    with pytest.raises(ShapeError, match="trellis tiles"):
        q.quantize(torch.randn(24, 64), correlated_hessian(64), make_config("qtip", {"L": 8}))
    with pytest.raises(ConfigError, match="code"):
        make_config("qtip", {"code": "e8p"})
    with pytest.raises(ConfigError, match="trellis L"):
        make_config("qtip", {"L": 2})


def test_tiny_model_quantizes_and_reloads_bit_identically(tmp_path):
    lm = make_tiny_model("llama")
    corpus = tmp_path / "calib.txt"
    corpus.write_text(TINY_TEXT * 30, encoding="utf-8")
    store = calibrate(lm, CalibSpec(corpus=str(corpus), windows=4, ctx=32, seed=0), root=tmp_path / "h")
    report = quantize_model(
        lm.model, "qtip", make_config("qtip", {"L": 8, "tile_rows": 8, "tile_cols": 8}), store
    )
    assert report.bpw < 2.1 and all(lr.proxy_rel < 0.2 for lr in report.layers)
    before, after = checkpoint_logits(lm, report, tmp_path / "ckpt")
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("m", "n", "opts"),
    [
        (48, 96, {"bits": 2}),  # byte-aligned rows: only the decoded rows' bytes are unpacked
        (24, 12, {"bits": 3, "tile_rows": 8, "tile_cols": 4}),  # 36-bit rows: unpack-all path
    ],
)
def test_on_the_fly_layer_matches_the_dense_weight(m, n, opts):
    from q2lab.quant.qtip.method import QTIPLinear

    w = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
    q = get_quantizer("qtip")
    qt = q.quantize(w, correlated_hessian(n), make_config("qtip", {"L": 8, **opts}))
    bias = torch.randn(m)
    x = torch.randn(2, 5, n)
    layer = q.make_linear(qt, bias, cache_weight=False)
    assert isinstance(layer, QTIPLinear)
    layer.chunk_rows = 20  # rounded down to whole tiles; several chunks, the last one short
    ref = F.linear(x, qt.dequantize(), bias)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer._cached is None  # nothing materialized
    assert torch.allclose(q.make_linear(qt, bias)(x), ref, atol=1e-5)
