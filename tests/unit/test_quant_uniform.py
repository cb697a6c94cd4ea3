"""Uniform grids, bit packing, RTN and GPTQ against independent oracles."""

from __future__ import annotations

import itertools

import pytest
import torch

from q2lab.calib.hessian import Hessian
from q2lab.errors import ConfigError, CorruptFileError, ShapeError
from q2lab.quant import get_quantizer, make_config
from q2lab.quant.gptq import block_bounds
from q2lab.quant.uniform import GroupLayout, fit_group, from_grid, round_to_grid
from q2lab.utils.packing import pack_bits, packed_nbytes, unpack_bits


def correlated_hessian(n: int, tokens: int = 4096, seed: int = 0) -> Hessian:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.2 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * torch.linspace(0.2, 3.0, n)
    return Hessian((x.T @ x).double(), tokens)


def proxy(w: torch.Tensor, q: torch.Tensor, h: Hessian) -> float:
    e = (w - q).double()
    return float(((e @ h.xtx) * e).sum() / h.n)


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_pack_roundtrip_every_width(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack_bits(packed, bits, numel), codes.to(torch.int32))


def test_pack_rejects_out_of_range_and_bad_sizes():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(CorruptFileError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 100)


# --------------------------------------------------------------------------- groups and grids
def test_group_layout_with_short_last_group():
    lay = GroupLayout.make(576, 128)
    assert lay.count == 5 and lay.bounds()[-1] == (512, 576)
    assert lay.sizes().tolist() == [128, 128, 128, 128, 64]
    assert GroupLayout.make(100, None).count == 1 and GroupLayout.make(100, 1000).g == 100


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_minmax_error_is_at_most_half_a_step_inside_the_range(bits):
    w = torch.randn(64, 128)
    scale, zero = fit_group(w, bits, symmetric=False)
    q = round_to_grid(w, scale, zero, bits)
    err = (from_grid(q, scale, zero) - w).abs()
    s = scale.unsqueeze(1)
    lo, hi = -zero.unsqueeze(1) * s, ((1 << bits) - 1 - zero.unsqueeze(1)) * s
    inside = (w >= lo) & (w <= hi)
    # inside the grid's range: nearest level; outside (the integer zero point shifts the grid
    # by < half a step): the clamped end level, less than one step away
    assert bool((err[inside] <= (s / 2).expand_as(w)[inside] * (1 + 1e-5)).all())
    assert bool((err <= s * (1 + 1e-5)).all())
    assert inside.float().mean() > 0.9


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_grid_represents_the_largest_weight_exactly(bits):
    w = torch.randn(32, 64)
    scale, zero = fit_group(w, bits, symmetric=True)
    deq = from_grid(round_to_grid(w, scale, zero, bits), scale, zero)
    idx = w.abs().argmax(1)
    rows = torch.arange(32)
    # exact up to fp16 rounding of the scale
    assert torch.allclose(deq[rows, idx], w[rows, idx], rtol=2e-3)


def test_mse_clipping_never_worse_than_minmax():
    w = torch.randn(128, 128) * torch.rand(128, 1)
    w[0, 0] = 25.0  # an outlier wastes range under min/max
    for bits in (2, 3):
        errs = {}
        for clip in ("minmax", "mse"):
            s, z = fit_group(w, bits, False, clip)
            errs[clip] = (from_grid(round_to_grid(w, s, z, bits), s, z) - w).pow(2).sum(1)
        assert bool((errs["mse"] <= errs["minmax"] + 1e-6).all())
        assert float(errs["mse"].sum()) < float(errs["minmax"].sum())


# --------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group", [(2, 128), (3, 64), (4, None), (8, 32)])
def test_rtn_exact_bits_and_roundtrip(bits, group, symmetric):
    rows, cols = 48, 576
    w = torch.randn(rows, cols)
    qt = get_quantizer("rtn").quantize(
        w, None, make_config("rtn", {"bits": bits, "group_size": group, "symmetric": symmetric})
    )
    groups = -(-cols // (group or cols))
    per_group = 16 + (0 if symmetric else bits)
    assert qt.bits() == rows * cols * bits + rows * groups * per_group
    assert qt.nbytes() * 8 >= qt.bits()
    deq = qt.dequantize()
    assert deq.shape == w.shape
    # independent decode from the raw stored tensors: w = (q − z)·s per group
    q = unpack_bits(qt.tensors["codes"], bits, rows * cols).view(rows, cols).float()
    scales = qt.tensors["scales"].float()
    zeros = (
        torch.full_like(scales, 2.0 ** (bits - 1))
        if symmetric
        else unpack_bits(qt.tensors["zeros"], bits, scales.numel()).view_as(scales).float()
    )
    g = group or cols
    col_group = torch.arange(cols) // g
    assert torch.equal(deq, (q - zeros[:, col_group]) * scales[:, col_group])
    # every weight is within one grid step of its decoded value (plus the fp16 rounding of the
    # scale, which the clamped end level can accumulate over 2^(bits-1) steps)
    slack = 1 + 2 ** (bits - 1) * 2**-10
    assert bool(((deq - w).abs() <= scales.abs()[:, col_group] * slack).all())


def test_rtn_error_shrinks_with_bits():
    w = torch.randn(64, 256)
    errs = [
        float(
            (get_quantizer("rtn").quantize(w, None, make_config("rtn", {"bits": b})).dequantize() - w)
            .pow(2)
            .mean()
        )
        for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


# --------------------------------------------------------------------------- GPTQ
def test_gptq_with_identity_hessian_equals_rtn():
    w = torch.randn(64, 200)
    h = Hessian(torch.eye(200, dtype=torch.float64) * 7, 7)
    # with H ∝ I the importance weights are uniform, so the weighted search is RTN's search too
    for opts in (
        {"bits": 2, "group_size": 64, "clip": "minmax"},
        {"bits": 3, "group_size": None, "clip": "mse"},
        {"bits": 4, "symmetric": True, "clip": "minmax"},
        {"bits": 2, "clip": "mse"},
    ):
        rtn = get_quantizer("rtn").quantize(w, None, make_config("rtn", opts)).dequantize()
        gptq = get_quantizer("gptq").quantize(w, h, make_config("gptq", opts)).dequantize()
        assert torch.equal(rtn, gptq), opts


@pytest.mark.parametrize(
    "opts",
    [
        {"bits": 2, "group_size": 128},
        {"bits": 3, "group_size": 64, "act_order": False},
        {"bits": 4, "group_size": None},
        {"bits": 2, "group_size": 32, "clip": "mse", "symmetric": True},
    ],
)
def test_gptq_lowers_proxy_loss_vs_rtn(opts):
    n = 192
    h = correlated_hessian(n)
    w = torch.randn(96, n) * 0.05
    rtn = get_quantizer("rtn").quantize(
        w, None, make_config("rtn", {k: v for k, v in opts.items() if k != "act_order"})
    )
    gptq = get_quantizer("gptq").quantize(w, h, make_config("gptq", opts))
    assert proxy(w, gptq.dequantize(), h) < 0.8 * proxy(w, rtn.dequantize(), h)


@pytest.mark.parametrize("group", [32, 48])
def test_gptq_static_groups_keep_groups_in_the_original_order(group):
    """Static groups: each group's range is the closed-form fit of the original columns (before
    any error feedback), codes are stored unpermuted (no ``perm``), and the act-order run still
    beats both RTN and GPTQ without act order on a correlated Hessian."""
    from q2lab.quant import uniform

    n = 192
    h = correlated_hessian(n, seed=2)  # a spread diagonal: act order matters
    w = torch.randn(64, n) * 0.05
    base = {"bits": 3, "group_size": group}
    q = get_quantizer("gptq")
    static = q.quantize(w, h, make_config("gptq", {**base, "static_groups": True}))
    assert "perm" not in static.tensors and static.meta["group_size"] == group
    layout = uniform.GroupLayout.make(n, group)
    imp = torch.diagonal(h.mean(torch.float32))
    for gi, (s, e) in enumerate(layout.bounds()):
        scale, _ = uniform.fit_group(w[:, s:e], 3, False, "mse", imp[s:e])
        assert torch.equal(static.tensors["scales"][:, gi].float(), scale), gi
    plain = q.quantize(w, h, make_config("gptq", {**base, "act_order": False}))
    rtn = get_quantizer("rtn").quantize(w, None, make_config("rtn", base))
    loss = proxy(w, static.dequantize(), h)
    assert loss < proxy(w, plain.dequantize(), h) < proxy(w, rtn.dequantize(), h)
    # the option is left out of the config dict at its default (cell ids of older records hold)
    assert "static_groups" not in make_config("gptq", base).to_dict()
    assert make_config("gptq", {**base, "static_groups": True}).to_dict()["static_groups"] is True


@pytest.mark.parametrize("group", [32, 128, 300, None])
def test_lazy_batches_match_the_unbatched_algorithm(group):
    n = 256
    h = correlated_hessian(n, seed=1)
    w = torch.randn(40, n)
    base = {"bits": 3, "group_size": group}
    lazy = get_quantizer("gptq").quantize(w, h, make_config("gptq", {**base, "block_size": 64})).dequantize()
    plain = get_quantizer("gptq").quantize(w, h, make_config("gptq", {**base, "block_size": 1})).dequantize()
    assert abs(proxy(w, lazy, h) - proxy(w, plain, h)) <= 1e-4 * proxy(w, plain, h)
    assert float((lazy != plain).float().mean()) < 0.01  # only rare float-rounding ties differ


def test_block_bounds_keep_group_starts_at_up_to_date_columns():
    for n, g, b in [(576, 128, 128), (576, 32, 128), (576, 300, 128), (100, 7, 16)]:
        bounds = block_bounds(n, g, b)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(e0 == s1 for (_, e0), (s1, _) in itertools.pairwise(bounds))
        assert all(e - s <= b for s, e in bounds)
        starts = {s for s, _ in bounds}
        for gs in range(0, n, g):
            ge = min(gs + g, n)
            if g <= b:  # a group never spans two blocks
                assert any(s <= gs and ge <= e for s, e in bounds)
            else:  # a long group starts a block
                assert gs in starts


def test_gptq_stacked_rows_equal_separate_runs():
    h = correlated_hessian(64)
    ws = [torch.randn(16, 64), torch.randn(8, 64)]
    q = get_quantizer("gptq")
    cfg = make_config("gptq", {"bits": 3, "group_size": 32})
    stacked = q.quantize_many(ws, h, cfg)
    for w, qt in zip(ws, stacked):
        assert torch.equal(qt.dequantize(), q.quantize(w, h, cfg).dequantize())


def test_gptq_handles_dead_columns_and_singular_hessians():
    n = 64
    x = torch.randn(10, n)
    x[:, :5] = 0  # dead inputs, and rank 10 < 64
    h = Hessian((x.T @ x).double(), 10)
    w = torch.randn(8, n)
    deq = (
        get_quantizer("gptq").quantize(w, h, make_config("gptq", {"bits": 2, "group_size": 32})).dequantize()
    )
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, :5], torch.zeros(8, 5))  # dead inputs are zeroed, as in GPTQ


def test_gptq_input_errors_are_clear():
    q = get_quantizer("gptq")
    cfg = make_config("gptq", {"bits": 2})
    with pytest.raises(ConfigError, match="needs calibration Hessians"):
        q.quantize(torch.randn(4, 8), None, cfg)
    with pytest.raises(ShapeError, match="does not fit"):
        q.quantize(torch.randn(4, 8), Hessian(torch.eye(16, dtype=torch.float64), 1), cfg)


# --------------------------------------------------------------------------- configs and registry
def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"unknown method 'gptqq'.*gptq.*rtn"):
        make_config("gptqq", {})
    with pytest.raises(ConfigError, match=r"bits must be an integer in \[1, 8\]"):
        make_config("rtn", {"bits": 9})
    with pytest.raises(ConfigError, match="group_size must be a positive integer"):
        make_config("gptq", {"group_size": 0})
    with pytest.raises(ConfigError, match=r"unknown option.*group.*known options"):
        make_config("rtn", {"group": 64})
    with pytest.raises(ConfigError, match="damp"):
        make_config("gptq", {"damp": 2.0})
    assert make_config("rtn", {"bits": "3", "symmetric": "true", "group_size": -1}).to_dict() == {
        "bits": 3,
        "group_size": None,
        "symmetric": True,
        "clip": "minmax",
    }
