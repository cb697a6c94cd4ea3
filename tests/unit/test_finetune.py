"""Fine-tuning (q2lab/finetune): the relaxation writes back exactly into the stored format, the
top-k KL equals the closed-form KL when k is the vocabulary, tuning lowers the block-output
error and the KL to the float model on windows it never saw, bpw is counted, checkpoints
round-trip."""

from __future__ import annotations

import pytest
import torch

from q2lab.data.text import corpus_windows, load_corpus
from q2lab.errors import ConfigError
from q2lab.finetune import finetuner
from q2lab.finetune.relax import TunableLinear
from q2lab.finetune.train import topk_kl
from q2lab.quant import make_config
from q2lab.quant.base import get_quantizer
from q2lab.quant.model import quantize_model
from tests.tiny import make_tiny_model

FT = {"block_epochs": 3, "e2e_epochs": 3, "windows": 8, "lr": 0.01}
BASE = {"quip#": {"bits": 2}, "qtip": {"L": 8, "tile_rows": 8, "tile_cols": 8}}


@pytest.fixture(scope="module")
def setup(tiny_calibrated, tiny_text_file):
    ref, store = tiny_calibrated
    # test windows: the same corpus read sequentially (the tuning windows are random offsets)
    test = corpus_windows(ref, load_corpus(str(tiny_text_file)), 4, 48, mode="sequential")
    return ref, store, test


def _quantized(setup, method: str, ft: dict | None):
    ref, store, _ = setup
    lm = make_tiny_model("llama")
    cfg = make_config(method, {**BASE[method], "finetune": ft})
    report = quantize_model(lm.model, method, cfg, store, tuner=finetuner(ref, store, cfg))
    return lm, report


@torch.no_grad()
def _kl(ref, model, x: torch.Tensor) -> float:
    lp = torch.log_softmax(ref.model(x).logits, -1)
    lq = torch.log_softmax(model(x).logits, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
def _block0_rel_err(ref, model, x: torch.Tensor) -> float:
    outs: list[torch.Tensor] = []

    def keep(_mod, _args, out) -> None:
        outs.append(out[0] if isinstance(out, tuple) else out)

    for m in (ref.model, model):
        h = m.model.layers[0].register_forward_hook(keep)
        m(x)
        h.remove()
    return float((outs[1] - outs[0]).square().mean() / outs[0].square().mean())


def test_tuned_layer_writes_back_exactly():
    """Gains and scale set to fp16-exact values: the hardened layer (decoded from its stored
    tensors) computes what the relaxed layer computed."""
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    from q2lab.calib.hessian import Hessian

    x = torch.randn(256, 64)
    for method in ("quip#", "qtip"):
        cfg = make_config(method, BASE[method])
        qt = get_quantizer(method).quantize(w, Hessian((x.T @ x).double(), 256), cfg)
        layer = get_quantizer(method).make_linear(qt, None)
        tl = TunableLinear(layer, gains=True)
        with torch.no_grad():
            tl.ga.copy_(torch.randint(4, 12, (32,)) / 8)
            tl.gb.copy_(torch.randint(-12, 12, (64,)) / 8)
            tl.t.fill_(1.0)
        hard = tl.harden()
        assert hard.bit_counts["gains"] == 16 * (32 + 64)
        torch.testing.assert_close(hard(x), tl(x), rtol=1e-5, atol=1e-5)


def test_topk_kl_is_the_closed_form_kl_at_full_k_and_a_lower_bound_below():
    torch.manual_seed(0)
    t, s = torch.randn(5, 40) * 2, torch.randn(5, 40) * 2
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    full = float((lp.exp() * (lp - lq)).sum(-1).mean())
    vals, idx = lp.topk(40, -1)
    assert abs(float(topk_kl(s, vals, idx)) - full) < 1e-5
    vals, idx = lp.topk(6, -1)
    assert 0 < float(topk_kl(s, vals, idx)) <= full + 1e-6


@pytest.mark.parametrize("method", ["quip#", "qtip"])
def test_finetuning_lowers_error_on_unseen_windows_and_counts_bits(setup, method):
    ref, _, test = setup
    plain, rep0 = _quantized(setup, method, None)
    block_only, _ = _quantized(setup, method, {**FT, "e2e_epochs": 0})
    both, rep2 = _quantized(setup, method, FT)
    assert _block0_rel_err(ref, block_only.model, test) < _block0_rel_err(ref, plain.model, test)
    assert _kl(ref, both.model, test) < _kl(ref, plain.model, test)
    st = rep2.finetune
    assert st["blocks"][0]["valid_rel_mse_after"] < st["blocks"][0]["valid_rel_mse_before"]
    # gains are stored: +16 bits per row and per column of every tuned matrix, and counted
    extra = sum(16 * (lr.shape[0] + lr.shape[1]) for lr in rep0.layers)
    assert rep2.bits == rep0.bits + extra
    assert "finetune" in rep2.to_dict()
    # only the continuous parameters of quantized layers and the norms move; the rest is frozen
    fresh = make_tiny_model("llama").model
    assert torch.equal(both.model.lm_head.weight, fresh.lm_head.weight)
    assert torch.equal(both.model.model.embed_tokens.weight, fresh.model.embed_tokens.weight)
    norms = [(n, p) for n, p in both.model.named_parameters() if "norm" in n]
    assert any(not torch.equal(p, fresh.get_parameter(n)) for n, p in norms)


def test_without_gains_bpw_is_unchanged_and_checkpoint_roundtrips(setup, tmp_path):
    from q2lab.export.checkpoint import save_checkpoint
    from q2lab.models import load_model

    _, _, test = setup
    _, rep0 = _quantized(setup, "quip#", None)
    lm, rep = _quantized(setup, "quip#", {**FT, "gains": False, "e2e_epochs": 1})
    assert rep.bits == rep0.bits
    lm2, rep2 = _quantized(setup, "quip#", {**FT, "e2e_epochs": 1})
    for model, report, name in ((lm, rep, "a"), (lm2, rep2, "b")):
        with torch.no_grad():
            before = model.model(test).logits
        save_checkpoint(model, tmp_path / name, report.to_dict())
        loaded = load_model(str(tmp_path / name))
        with torch.no_grad():
            assert torch.equal(loaded.model(test).logits, before)


def test_clear_errors(setup):
    _, store, _ = setup
    with pytest.raises(ConfigError, match="unknown finetune option"):
        make_config("quip#", {"finetune": {"epochs": 2}})
    with pytest.raises(ConfigError, match="block_epochs"):
        make_config("qtip", {"finetune": {"block_epochs": -1}})
    lm = make_tiny_model("llama")
    with pytest.raises(ConfigError, match="windows"):
        quantize_model(lm.model, "quip#", make_config("quip#", {"finetune": {}}), store)


def test_study_sweeps_with_and_without_finetuning_and_keeps_old_cell_ids():
    from q2lab.study.config import parse_study

    def cells(entry):
        raw = {
            "name": "t",
            "models": ["m"],
            "calibration": {"corpus": "wikitext2", "windows": 4, "ctx": 32, "seed": 0},
            "methods": [entry],
            "tasks": ["ppl:wikitext2"],
        }
        return parse_study(raw).cells

    plain = cells({"method": "quip#", "bits": 2})
    swept = cells({"method": "quip#", "bits": 2, "finetune": [None, {"block_epochs": 1}]})
    assert swept[0].id == plain[0].id  # off = the config as before the option existed
    assert len({c.id for c in swept}) == 2
    assert swept[1].config.to_dict()["finetune"] == {"block_epochs": 1}
    with pytest.raises(ConfigError, match="lr"):
        cells({"method": "qtip", "finetune": {"lr": -1}})
