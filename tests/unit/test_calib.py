"""Block-streamed calibration against a full-forward oracle; the store is computed once."""

from __future__ import annotations

import pytest
import torch

from q2lab.calib import store as store_mod
from q2lab.calib.capture import ActivationBuffer, stream_hessians
from q2lab.calib.hessian import HessianAccumulator
from q2lab.calib.store import CalibSpec, HessianStore, calibrate
from q2lab.errors import CorruptFileError, DataError, ModelError, ShapeError
from q2lab.models import find_decoder
from tests.tiny import make_tiny_model


def oracle_hessians(model, windows):
    """XᵀX of every linear's input from one ordinary forward pass of all windows (float64)."""
    layout = find_decoder(model)
    out, handles = {}, []
    for b in range(len(layout)):
        for name, mod in layout.block_linears(b).items():

            def hook(_m, args, key=(b, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                out[key] = out.get(key, 0) + x.T @ x

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
def test_streamed_hessians_equal_full_forward(arch):
    lm = make_tiny_model(arch)
    windows = torch.randint(2, len(lm.tokenizer), (4, 20))
    got, groups_seen = {}, {}

    def on_block(b, hessians, groups):
        groups_seen[b] = groups
        for lin, leader in groups.items():
            got[(b, lin)] = hessians[leader]

    stream_hessians(lm.model, windows, on_block)
    ref = oracle_hessians(lm.model, windows)
    assert set(got) == set(ref)
    for key, h in got.items():
        assert h.n == 4 * 20
        assert float((h.xtx - ref[key]).abs().max()) <= 1e-5 * float(ref[key].abs().max())
    # q/k/v share one input, gate/up another: 4 distinct Hessians per block
    assert len(set(groups_seen[0].values())) == 4
    assert groups_seen[0]["self_attn.k_proj"] == groups_seen[0]["self_attn.q_proj"]
    assert groups_seen[0]["mlp.up_proj"] == groups_seen[0]["mlp.gate_proj"]
    assert groups_seen[0]["mlp.down_proj"] == "mlp.down_proj"


def test_accumulator_is_float64_and_checks_width():
    acc = HessianAccumulator(3)
    acc.add(torch.tensor([[1.0, 2.0, 3.0]]))
    acc.add(torch.tensor([[[1.0, 0.0, 0.0]]]))
    h = acc.result()
    assert h.xtx.dtype == torch.float64 and h.n == 2
    assert h.importance().tolist() == [1.0, 2.0, 4.5]
    with pytest.raises(ShapeError):
        acc.add(torch.ones(2, 4))


def test_activation_buffer_roundtrip(tmp_path):
    buf = ActivationBuffer(tmp_path, "a", n=3, ctx=5, width=4)
    xs = [torch.randn(5, 4) for _ in range(3)]
    for i in (2, 0, 1):
        buf.write(i, xs[i])
    assert buf.path.stat().st_size == 3 * 5 * 4 * 4
    for i in range(3):
        assert torch.equal(buf.read(i)[0], xs[i])


@pytest.fixture()
def text_corpus(tmp_path):
    from tests.tiny import TINY_TEXT

    p = tmp_path / "calib.txt"
    p.write_text(TINY_TEXT * 30, encoding="utf-8")
    return str(p)


def test_store_is_computed_once_and_reused(tmp_path, text_corpus, monkeypatch):
    lm = make_tiny_model("llama")
    calls = []
    real = store_mod.stream_hessians
    monkeypatch.setattr(store_mod, "stream_hessians", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    spec = CalibSpec(corpus=text_corpus, windows=6, ctx=16, seed=3)
    first = calibrate(lm, spec, root=tmp_path)
    second = calibrate(lm, spec, root=tmp_path)
    assert calls == [1] and first.path == second.path
    # a different key (seed) computes a new store next to it
    third = calibrate(lm, CalibSpec(corpus=text_corpus, windows=6, ctx=16, seed=4), root=tmp_path)
    assert calls == [1, 1] and third.path != first.path
    # contents: every linear has a Hessian of the right size from 6 × 16 tokens
    layout = find_decoder(lm.model)
    h = first.hessian(layout.full_name(1, "mlp.down_proj"))
    assert h.xtx.shape == (96, 96) and h.n == 96
    assert first.manifest["tokens"] == 96 and first.describe()["seed"] == 3
    with pytest.raises(ModelError, match="no entry for layer"):
        first.hessian("model.layers.9.mlp.up_proj")
    assert not list(tmp_path.glob(".*tmp"))  # no leftovers of the atomic build


def test_store_errors_are_clear(tmp_path, text_corpus):
    with pytest.raises(CorruptFileError, match="not a q2lab Hessian store"):
        HessianStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        HessianStore(tmp_path)
    lm = make_tiny_model("llama")
    with pytest.raises(DataError, match="not enough for 500 windows"):
        calibrate(lm, CalibSpec(corpus=text_corpus, windows=500, ctx=1_000_000), root=tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
