"""VPTQ and AQLM against brute force (per-block / per-group optimal codes), Gaussian rates, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from q2lab.calib.hessian import Hessian
from q2lab.errors import ConfigError, ModelError, ShapeError
from q2lab.quant import aqlm
from q2lab.quant.base import get_quantizer, make_config
from q2lab.quant.ldlq import proxy_loss

LLOYD_MAX_2BIT = 0.1175


def correlated_hessian(n: int, seed: int = 0) -> Hessian:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.5 * torch.randn(n, n, generator=g) / math.sqrt(n)
    x = torch.randn(16 * n, n, generator=g) @ mix
    return Hessian((x.T @ x).double(), x.shape[0])


def identity_hessian(n: int) -> Hessian:
    return Hessian(torch.eye(n, dtype=torch.float64) * 100, 100)


def test_vptq_rounds_one_block_to_its_proxy_optimal_codeword():
    # one vector per row (n = v): LDLQ has no feedback, and the codeword chosen in the block's LDL
    # metric must be the one with the lowest proxy loss (ŵ − w) H (ŵ − w)ᵀ among all codewords
    n = 4
    hess = correlated_hessian(n, 1)
    w = torch.randn(600, n, generator=torch.Generator().manual_seed(2))
    cfg = make_config("vptq", {"bits": 2, "vector_len": 4, "tune_steps": 0, "damp": 0.0})
    qt = get_quantizer("vptq").quantize(w, hess, cfg)
    book = qt.tensors["codebook"].float()
    h = hess.mean(torch.float32)
    err = w.unsqueeze(1) - book.unsqueeze(0)  # (rows, K, v)
    losses = torch.einsum("rkv,vu,rku->rk", err, h, err)
    chosen = qt.dequantize()
    chosen_loss = torch.einsum("rv,vu,ru->r", w - chosen, h, w - chosen)
    assert torch.allclose(chosen_loss, losses.min(1).values, rtol=1e-4, atol=1e-5)


def test_aqlm_beam_search_finds_the_optimal_code_of_one_group():
    # one codebook, one group per row: any beam ≥ 1 must reach the brute-force optimum
    g = 4
    hess = correlated_hessian(g, 3)
    h = hess.mean(torch.float32)
    w = torch.randn(50, g, generator=torch.Generator().manual_seed(4))
    books = torch.randn(1, 16, g, generator=torch.Generator().manual_seed(5))
    scales = torch.rand(50, generator=torch.Generator().manual_seed(6)) + 0.5
    codes = torch.zeros(50, 1, 1, dtype=torch.int64)
    found = aqlm.beam_search(w, h, books, codes, scales, beam=1)
    cand = scales.view(-1, 1, 1) * books[0].unsqueeze(0)  # (rows, K, g)
    err = w.unsqueeze(1) - cand
    best = torch.einsum("rkv,vu,rku->rk", err, h, err).argmin(1)
    assert torch.equal(found[:, 0, 0], best)


def test_aqlm_beam_search_never_increases_the_loss_and_wider_beams_help():
    n, rows = 32, 64
    hess = correlated_hessian(n, 7)
    h = hess.mean(torch.float32)
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(8))
    books = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(9)) * 0.5
    scales = torch.ones(rows)
    codes = torch.zeros(rows, n // 8, 2, dtype=torch.int64)

    def loss(c):
        e = w - aqlm._decode(books, c, scales)
        return ((e @ h) * e).sum(1)

    start = loss(codes)
    one = aqlm.beam_search(w, h, books, codes, scales, beam=1)
    four = aqlm.beam_search(w, h, books, codes, scales, beam=4)
    assert bool((loss(one) <= start + 1e-4).all())
    assert float(loss(four).sum()) < float(loss(one).sum())


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("vptq", {"bits": 2, "vector_len": 4, "tune_steps": 0}),
        ("aqlm", {"bits": 2, "codebooks": 1, "codebook_bits": 8, "group": 4, "rounds": 1, "tune_steps": 0}),
    ],
)
def test_two_bit_codes_beat_the_scalar_optimum_on_gaussian_weights(method, opts):
    # identity Hessian: the proxy loss is the MSE; a 4-dim 256-entry book (2 bits per weight,
    # codebook not counted) must beat the Lloyd–Max scalar quantizer and stay above D(2) = 1/16
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(10))
    qt = get_quantizer(method).quantize(w, identity_hessian(512), make_config(method, opts))
    mse = float((w - qt.dequantize()).square().mean())
    code_bits = sum(v for k, v in qt.bit_counts.items() if k.startswith("codes")) / qt.numel()
    assert code_bits == 2.0
    assert 2.0**-4 < mse < LLOYD_MAX_2BIT


def test_tuning_lowers_the_proxy_loss():
    n = 64
    hess = correlated_hessian(n, 11)
    h = hess.mean(torch.float32)
    w = torch.randn(128, n, generator=torch.Generator().manual_seed(12))
    base = {"bits": 2, "vector_len": 4}
    loss = {}
    for steps in (0, 30):
        qt = get_quantizer("vptq").quantize(w, hess, make_config("vptq", {**base, "tune_steps": steps}))
        loss[steps] = proxy_loss(w, qt.dequantize(), h)
    assert loss[30] < loss[0]
    a0 = get_quantizer("aqlm").quantize(w, hess, make_config("aqlm", {"rounds": 0}))
    a2 = get_quantizer("aqlm").quantize(w, hess, make_config("aqlm", {"rounds": 2, "tune_steps": 20}))
    assert proxy_loss(w, a2.dequantize(), h) < proxy_loss(w, a0.dequantize(), h)


def test_residual_codebook_adds_its_bits_and_lowers_the_error():
    n = 64
    hess = correlated_hessian(n, 13)
    w = torch.randn(256, n, generator=torch.Generator().manual_seed(14))
    plain = get_quantizer("vptq").quantize(w, hess, make_config("vptq", {"bits": 2, "tune_steps": 0}))
    res = get_quantizer("vptq").quantize(
        w, hess, make_config("vptq", {"bits": 2, "residual_bits": 4, "tune_steps": 0})
    )
    v = plain.meta["vector_len"]
    assert res.bits() - plain.bits() == 256 * n // v * 4 + 16 * v * 16
    h = hess.mean(torch.float32)
    assert proxy_loss(w, res.dequantize(), h) < proxy_loss(w, plain.dequantize(), h)


@pytest.mark.parametrize(("method", "opts"), [("vptq", {}), ("aqlm", {})])
def test_codebook_counts_in_bpw(method, opts):
    hess = identity_hessian(64)
    qt = get_quantizer(method).quantize(torch.randn(256, 64), hess, make_config(method, opts))
    books = sum(v for key, v in qt.bit_counts.items() if "codebook" in key)
    assert books > 0 and qt.bpw() > 2.0
    assert books == sum(t.numel() * 16 for key, t in qt.tensors.items() if "codebook" in key)


def test_bad_input_is_one_clear_error():
    hess = identity_hessian(64)
    with pytest.raises(ConfigError, match="larger than the layer's 32 vectors"):
        get_quantizer("vptq").quantize(
            torch.randn(8, 64), hess, make_config("vptq", {"bits": 1, "vector_len": 16})
        )
    with pytest.raises(ConfigError, match="larger than the layer's"):
        get_quantizer("aqlm").quantize(torch.randn(4, 64), hess, make_config("aqlm", {}))
    with pytest.raises(ShapeError, match="not a multiple of vector_len 5"):
        get_quantizer("vptq").quantize(
            torch.randn(8, 64), hess, make_config("vptq", {"vector_len": 5, "bits": 1})
        )
    with pytest.raises(ShapeError, match="not a multiple of the group size 6"):
        get_quantizer("aqlm").quantize(
            torch.randn(8, 64), hess, make_config("aqlm", {"group": 6, "bits": 4, "codebooks": 3})
        )
    w = torch.randn(64, 64)
    w[3, 3] = float("inf")
    for method in ("vptq", "aqlm"):
        with pytest.raises(ModelError, match="non-finite"):
            get_quantizer(method).quantize(w, hess, make_config(method, {}))
    with pytest.raises(ConfigError, match="codebooks × codebook_bits"):
        make_config("aqlm", {"bits": 2, "codebooks": 1, "codebook_bits": 8})
    with pytest.raises(ConfigError, match="at most 16"):
        make_config("vptq", {"bits": 3, "vector_len": 8})


def test_vptq_outlier_columns_get_their_own_book_and_are_counted():
    # a few input channels carry most of the output error (H_jj 400× the rest): keeping them in
    # a finer book of short vectors must lower the proxy loss, and its storage is counted
    n, m, k = 64, 256, 8
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4096, n, generator=g)
    hot = torch.tensor([3, 17, 18, 30, 41, 42, 50, 63])
    x[:, hot] *= 20.0
    hess = Hessian((x.T @ x).double(), x.shape[0])
    h = hess.mean(torch.float32)
    w = torch.randn(m, n, generator=g)
    base = {"bits": 2, "vector_len": 4, "tune_steps": 10}
    plain = get_quantizer("vptq").quantize(w, hess, make_config("vptq", base))
    opts = {**base, "outlier_cols": k, "outlier_vector_len": 2, "outlier_bits": 4}
    qt = get_quantizer("vptq").quantize(w, hess, make_config("vptq", opts))
    assert torch.equal(qt.tensors["outlier_idx"].long(), hot)
    extra = m * k * 4 + 256 * 2 * 16 + k * 6 - (m * k // 4 * 8)  # outlier codes + book + indices − main codes
    assert qt.bits() - plain.bits() == extra
    # Hessian-weighted k-means alone spends the shared book on the hot coordinates (their MSE is
    # tiny, the other columns' large); with their own book the main book serves the rest
    assert proxy_loss(w, qt.dequantize(), h) < 0.95 * proxy_loss(w, plain.dequantize(), h)
    cold = torch.ones(n, dtype=torch.bool)
    cold[hot] = False
    mse = {name: ((w - t.dequantize()) ** 2)[:, cold].mean() for name, t in (("plain", plain), ("out", qt))}
    assert mse["out"] < 0.5 * mse["plain"]
    from q2lab.quant.vptq import decode_rows

    full = qt.dequantize()
    assert torch.equal(torch.cat([decode_rows(qt, 0, 100), decode_rows(qt, 100, m)]), full)
    from q2lab.quant.vq import load_codes

    codes = load_codes(qt.tensors["codes_out"], 8, m * k // 2)
    assert torch.equal(full[:, hot], qt.tensors["codebook_out"].float()[codes].reshape(m, k))


def test_vptq_outlier_options_are_checked():
    hess = identity_hessian(64)
    with pytest.raises(ConfigError, match="multiple of outlier_vector_len"):
        make_config("vptq", {"outlier_cols": 3, "outlier_vector_len": 2})
    with pytest.raises(ConfigError, match="outlier_bits × outlier_vector_len"):
        make_config("vptq", {"outlier_cols": 8, "outlier_vector_len": 4, "outlier_bits": 5})
    with pytest.raises(ShapeError, match="fewer than the layer's 64"):
        get_quantizer("vptq").quantize(torch.randn(64, 64), hess, make_config("vptq", {"outlier_cols": 64}))
    with pytest.raises(ShapeError, match="after 2 outlier columns"):
        get_quantizer("vptq").quantize(torch.randn(64, 64), hess, make_config("vptq", {"outlier_cols": 2}))
    with pytest.raises(ConfigError, match="larger than the layer's 240 vectors of 2"):
        get_quantizer("vptq").quantize(torch.randn(60, 64), hess, make_config("vptq", {"outlier_cols": 8}))


def test_vptq_outlier_pct_picks_the_nearest_feasible_column_count():
    from q2lab.quant.vptq import _outlier_count

    cfg = make_config("vptq", {"bits": 2, "vector_len": 6, "outlier_pct": 1.0, "outlier_vector_len": 4})
    # k must be a multiple of 4 leaving a multiple of 6: multiples of 12 for these widths
    assert _outlier_count(576, cfg) == 12  # 5.76 wanted
    assert _outlier_count(1536, cfg) == 12  # 15.36 wanted: 12 is nearer than 24
    # 61.44 wanted, multiples of 4 feasible: 60 is nearer than 64
    assert _outlier_count(2048, make_config("vptq", {"vector_len": 4, "outlier_pct": 3.0})) == 60
    with pytest.raises(ShapeError, match="no outlier column count"):
        _outlier_count(6, make_config("vptq", {"vector_len": 6, "outlier_pct": 1.0, "outlier_vector_len": 4}))
    with pytest.raises(ConfigError, match="not both"):
        make_config("vptq", {"outlier_pct": 1.0, "outlier_cols": 2})
    with pytest.raises(ConfigError, match="outlier_pct must be"):
        make_config("vptq", {"outlier_pct": 60})


@pytest.mark.parametrize(
    ("method", "preset", "expect"),
    [
        ("vptq", "study", {"bits": 2, "vector_len": 8, "residual_bits": 8}),
        ("vptq", "v6-k4096-o1", {"vector_len": 6, "outlier_pct": 1.0, "outlier_vector_len": 4}),
        ("aqlm", "1x16", {"bits": 2, "codebooks": 1, "codebook_bits": 16, "group": 8}),
        ("aqlm", "2x8", {"bits": 2, "codebooks": 2, "codebook_bits": 8}),
    ],
)
def test_presets_set_their_options_and_explicit_options_win(method, preset, expect):
    cfg = make_config(method, {"preset": preset})
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert make_config(method, {"preset": preset, "seed": 7}).seed == 7
    assert make_config(method, {"preset": preset, "kmeans_iters": 3}).kmeans_iters == 3


def test_presets_index_bits_and_unknown_names():
    assert make_config("vptq", {"preset": "v8-k65536-256"}).index_bits() == 16
    assert make_config("vptq", {"preset": "v6-k4096"}).index_bits() == 12
    assert make_config("vptq", {"preset": "v6-k4096-o1"}).outlier_index_bits() == 12
    with pytest.raises(ConfigError, match=r"unknown preset 'v9'.*known presets: v8-k65536-0"):
        make_config("vptq", {"preset": "v9"})
    with pytest.raises(ConfigError, match=r"unknown preset '4x4'.*1x16, 2x8"):
        make_config("aqlm", {"preset": "4x4"})


def test_stored_codes_round_trip_at_any_width():
    from q2lab.quant.vq import load_codes, store_codes

    for bits in (3, 8, 12, 16):
        codes = torch.randint(0, 1 << bits, (48 * 8,), generator=torch.Generator().manual_seed(bits))
        s = store_codes(codes, bits)
        assert torch.equal(load_codes(s, bits, codes.numel()), codes)
        for a, b in itertools.combinations((0, 8, 24, 384), 2):
            assert torch.equal(load_codes(s, bits, codes.numel(), a, b), codes[a:b])


def test_model_report_counts_codebooks_apart(tmp_path):
    from q2lab.calib.store import CalibSpec, calibrate
    from q2lab.quant.model import quantize_model
    from tests.tiny import TINY_TEXT, make_tiny_model

    corpus = tmp_path / "calib.txt"
    corpus.write_text(TINY_TEXT * 30, encoding="utf-8")
    lm = make_tiny_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    store = calibrate(lm, CalibSpec(corpus=str(corpus), windows=4, ctx=32, seed=0), root=tmp_path / "h")
    report = quantize_model(lm.model, "aqlm", make_config("aqlm", {"rounds": 1, "tune_steps": 5}), store)
    d = report.to_dict()
    books = 2 * 256 * 8 * 16  # 2×8 codebooks per linear
    params = d["quantized_params"]
    assert d["bits"] - d["bpw_no_codebooks"] * params == pytest.approx(books * len(report.layers))
    # codes (2 bits) + fp16 row scales: no codebook left in bpw_no_codebooks
    rows = sum(lr.shape[0] for lr in report.layers)
    assert d["bpw_no_codebooks"] == pytest.approx((2 * params + 16 * rows) / params)
    assert (
        "bpw_no_codebooks"
        not in quantize_model(
            make_tiny_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1).model,
            "rtn",
            make_config("rtn", {"bits": 4}),
            None,
        ).to_dict()
    )
