"""PV-tuning (q2lab/finetune/pv.py, the V step in q2lab/quant/vq.py): the PV views decode exactly
what the stored layers decode and write back what was tuned; the V step re-chooses at most the
allowed fraction of codes, only towards the target, and with every vector allowed it is the
nearest-codeword assignment; on the tiny model, PV-tuning lowers the KL to the float model on
windows it never saw, changes codes, and keeps the bits."""

from __future__ import annotations

import pytest
import torch

from q2lab.calib.hessian import Hessian
from q2lab.codebooks.kmeans import nearest
from q2lab.errors import ConfigError
from q2lab.finetune import finetuner
from q2lab.finetune.pv import PVLinear
from q2lab.quant import make_config
from q2lab.quant.base import get_quantizer
from q2lab.quant.model import quantize_model
from q2lab.quant.vq import v_step
from tests.tiny import make_tiny_model
from tests.unit.test_finetune import _kl
from tests.unit.test_finetune import setup as tiny_setup  # noqa: F401  (a fixture: tiny model, store, windows)

LAYOUTS = [
    ("aqlm", {"preset": "2x8", "rounds": 1, "tune_steps": 5, "kmeans_iters": 3}),
    ("aqlm", {"bits": 2, "codebooks": 1, "codebook_bits": 8, "group": 4, "rounds": 1, "kmeans_iters": 3}),
    ("vptq", {"bits": 2, "residual_bits": 4, "tune_steps": 5}),
    ("vptq", {"bits": 2, "vector_len": 4, "outlier_cols": 4, "outlier_bits": 3, "tune_steps": 5}),
]


def _layer(method: str, opts: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 64, generator=g)
    x[:, :4] *= 8.0
    w = torch.randn(96, 64, generator=g)
    qt = get_quantizer(method).quantize(w, Hessian((x.T @ x).double(), 2048), make_config(method, opts))
    return w, qt


@pytest.mark.parametrize(("method", "opts"), LAYOUTS)
def test_view_decodes_the_stored_layer_and_writes_back_what_was_tuned(method, opts):
    _, qt = _layer(method, opts)
    view = get_quantizer(method).pv_view(qt)
    assert torch.equal(view.weight(), qt.dequantize())
    with torch.no_grad():  # fp16-exact new values, so the stored layer is exactly the tuned one
        for p in view.params.values():
            p.copy_((p * 1.25 + 0.125).half().float())
    for region in view.regions:
        region.codes.copy_(region.codes.flip(0))
    new = view.write()
    assert new.bit_counts == qt.bit_counts and new.tensors.keys() == qt.tensors.keys()
    assert torch.equal(new.dequantize(), view.weight())
    assert not torch.equal(new.dequantize(), qt.dequantize())


@pytest.mark.parametrize(("method", "opts"), LAYOUTS)
def test_v_step_changes_at_most_its_fraction_and_only_towards_the_target(method, opts):
    w, qt = _layer(method, opts)
    view = get_quantizer(method).pv_view(qt)
    start = [c.clone() for c in view.codes()]
    err0 = float((view.weight() - w).square().sum())
    n_vectors = sum(c.shape[0] for c in start)
    changed = v_step(view, w, 0.05)
    moved = sum(int((a != b).any(1).sum()) for a, b in zip(start, view.codes()))
    assert 0 < moved == changed
    assert all(int((a != b).any(1).sum()) <= int(0.05 * a.shape[0]) for a, b in zip(start, view.codes()))
    assert changed < n_vectors
    assert float((view.weight() - w).square().sum()) < err0


def test_v_step_with_every_vector_allowed_is_the_nearest_codeword():
    w, qt = _layer("vptq", {"bits": 2, "vector_len": 4, "tune_steps": 0})
    view = get_quantizer("vptq").pv_view(qt)
    target = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    v_step(view, target, 1.0)
    book = view.params["codebook"]
    assert torch.equal(view.codes()[0][:, 0], nearest(target.reshape(-1, 4), book))


def test_pv_linear_is_the_layer_and_its_gradient_reaches_the_books():
    _, qt = _layer("aqlm", LAYOUTS[0][1])
    layer = get_quantizer("aqlm").make_linear(qt, torch.randn(96))
    pl = PVLinear(layer)
    x = torch.randn(5, 64)
    torch.testing.assert_close(pl(x), layer(x), rtol=1e-5, atol=1e-5)
    pl.tracking = True
    pl(x).square().sum().backward()
    assert pl.tuned["codebooks"].grad is not None and pl.tuned["scales"].grad is not None
    rms = [float(p.detach().square().mean().sqrt()) for p in pl.tuned.values()]
    assert rms == pytest.approx([1.0, 1.0], rel=1e-4)  # trained in units of their RMS
    assert pl.grad_sum is not None and pl.grad_sum.shape == (96, 64)
    assert pl.v_step(1.0, 0.5) > 0  # a large step towards lower output moves codes


def test_finetune_mode_and_v_options_are_checked():
    for bad, match in (
        ({"mode": "dense"}, "finetune.mode"),
        ({"mode": "pv", "v_frac": 0}, "v_frac"),
        ({"mode": "pv", "v_lr": -1}, "v_lr"),
    ):
        with pytest.raises(ConfigError, match=match):
            make_config("aqlm", {"finetune": bad})
    from q2lab.quant.finetune_option import FinetuneConfig

    assert FinetuneConfig.parse({"mode": "pv", "v_lr": "1e-2"}).v_lr == 0.01  # YAML's string spelling


@pytest.mark.parametrize(("method", "opts"), [LAYOUTS[1], (LAYOUTS[2][0], {"bits": 2, "vector_len": 4})])
def test_v_steps_beat_continuous_tuning_alone_on_held_out_data(method, opts):
    """A layer fit to its calibration Hessian, tuned to reproduce the float layer on other
    inputs (isotropic, so the codes that were optimal are not any more): with the same P epochs,
    PV-tuning's V steps move codes and end lower on the held-out windows than the P step alone,
    and every kept V step lowered the held-out loss."""
    from q2lab.finetune.pv import pv_fit
    from q2lab.finetune.train import fit

    w, qt = _layer(method, {**opts, "tune_steps": 0})
    x = torch.randn(12, 512, 64, generator=torch.Generator().manual_seed(3))
    y = x @ w.T
    result = {}
    for mode in ("p", "pv"):
        root = torch.nn.Sequential(PVLinear(get_quantizer(method).make_linear(qt, None)))
        params = list(root.parameters())

        def loss_of(i: int, root=root) -> torch.Tensor:
            return (root(x[i]) - y[i]).square().mean()

        if mode == "p":
            result[mode] = fit(params, loss_of, list(range(9)), [9, 10, 11], 4, 0.01)
        else:
            result[mode] = pv_fit(root, params, loss_of, list(range(9)), [9, 10, 11], 4, 0.01, 0.05, 0.1)
    before, after, rounds = result["pv"]
    assert before == result["p"][0]
    assert after < result["p"][1]
    assert any(r["codes_changed"] > 0 for r in rounds)
    assert all(r["v_valid"] < r["p_valid"] for r in rounds if r["codes_changed"])


@pytest.mark.parametrize("method", ["aqlm", "vptq"])
def test_pv_tuning_in_quantize_model_lowers_unseen_kl_and_keeps_bits(tiny_setup, method):  # noqa: F811
    ref, store, test = tiny_setup
    base = {
        "aqlm": {"bits": 2, "codebooks": 1, "codebook_bits": 8, "group": 4, "rounds": 1},
        "vptq": {"bits": 2, "vector_len": 4},
    }[method]

    def run(ft):
        lm = make_tiny_model("llama")
        cfg = make_config(method, {**base, "finetune": ft})
        return lm, quantize_model(lm.model, method, cfg, store, tuner=finetuner(ref, store, cfg))

    plain, rep0 = run(None)
    ft = {"block_epochs": 2, "e2e_epochs": 3, "windows": 8, "lr": 0.01, "mode": "pv"}
    tuned, rep = run(ft)
    assert rep.bits == rep0.bits
    assert _kl(ref, tuned.model, test) < _kl(ref, plain.model, test)
    rounds = [r for b in rep.finetune["blocks"] for r in b["pv_rounds"]] + rep.finetune["e2e"]["pv_rounds"]
    assert rounds and all(r["v_valid"] <= r["p_valid"] for r in rounds)
