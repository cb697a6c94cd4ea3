"""GGUF → float folder, one tensor at a time (q2lab.models.gguf_loader): the tensors equal the
model the file was written from (F32 export, every architecture q2lab exports) and what
transformers' whole-model conversion makes of the same file; the result loads lazily.
(The packaged models' conversions are checked against transformers in
tests/integration/test_parity.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from q2lab.export.gguf import export_gguf
from q2lab.models import gguf_loader, load_model
from q2lab.models.arch import find_decoder
from q2lab.models.lazy import resident
from tests.tiny import make_tiny_model

ARCHS = {
    "llama": {},  # Q/K rows permuted in the file
    "qwen2": {},  # Q/K/V biases
    "gemma3": {},  # norms stored as 1 + w
    "qwen3": {"head_dim": 16},  # Q/K norms
    "phi3": {"pad_token_id": 1},  # fused QKV and gate/up
}


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_streamed_conversion_recovers_the_exported_model(arch, tmp_path):
    lm = make_tiny_model(arch, **ARCHS[arch])
    lm.info.name = "tiny"  # see test_architectures: llama.cpp keys Phi-3 tokens on the name
    path = tmp_path / "m.gguf"
    export_gguf(lm, path, "F32")
    gguf_loader._convert(path, tmp_path / "c", "digest", streamed=True)
    got = _tensors(tmp_path / "c")
    want = {k: v for k, v in lm.model.state_dict().items() if k in got or k != "lm_head.weight"}
    assert sorted(got) == sorted(k for k in want if "rotary" not in k)
    assert [k for k in got if not torch.equal(got[k], want[k])] == []
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    layers = lm.model.config.num_hidden_layers
    assert len(set(index["weight_map"].values())) == layers + 1  # one shard per block + the rest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_streamed_conversion_equals_transformers(arch, tmp_path):
    lm = make_tiny_model(arch, **ARCHS[arch])
    path = tmp_path / "m.gguf"
    export_gguf(lm, path, "F32")
    gguf_loader._convert(path, tmp_path / "a", "digest", streamed=True)
    gguf_loader._convert(path, tmp_path / "b", "digest", streamed=False)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert ca == cb


def test_a_gguf_loads_lazily(tmp_path, monkeypatch):
    monkeypatch.setenv("Q2LAB_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    path = tmp_path / "m.gguf"
    export_gguf(lm, path, "F32")
    lazy = load_model(path, lazy=True)
    layout = find_decoder(lazy.model)
    assert all(p.is_meta for p in layout.layers.parameters())
    with resident(lazy.model, 0):
        got = dict(layout.layers[0].named_parameters())
        want = dict(find_decoder(lm.model).layers[0].named_parameters())
        assert [k for k in want if not torch.equal(got[k], want[k])] == []
