"""Model loading from every source kind, and architecture discovery."""

from __future__ import annotations

import pytest
import torch

from q2lab.errors import CorruptFileError, ModelError
from q2lab.models import find_decoder, load_model, zoo
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    lm = make_tiny_model("qwen2")
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path, lm


def test_load_local_hf_directory(tiny_dir):
    path, lm = tiny_dir
    loaded = load_model(str(path))
    assert loaded.info.kind == "hf_dir" and loaded.info.model_type == "qwen2"
    assert loaded.info.n_params == lm.info.n_params and len(loaded.info.fingerprint) == 64
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, lm.model(x).logits)
    assert load_model(str(path)).info.fingerprint == loaded.info.fingerprint  # stable


def test_load_hub_id_through_a_local_cache(tiny_dir, tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout (offline), not a network call."""
    path, _ = tiny_dir
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--q2lab--tiny-qwen2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in path.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = load_model("q2lab/tiny-qwen2")
    assert loaded.info.kind == "hf_hub" and loaded.info.path == str(snap)
    with pytest.raises(ModelError, match="cannot get q2lab/absent"):
        load_model("q2lab/absent")


def test_bad_model_sources_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match=r"without config\.json"):
        load_model(str(tmp_path))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(CorruptFileError, match="not a GGUF file"):
        load_model(str(bad))
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"not a \.gguf file"):
        load_model(str(txt))
    with pytest.raises(ModelError, match="unknown model alias"):
        zoo.fetch("smollm9")
    with pytest.raises(ModelError, match="cannot resolve model"):
        load_model("definitely not a model")


def test_truncated_gguf_is_reported_as_corrupt(tmp_path):
    from q2lab.models.gguf_loader import read_metadata

    bad = tmp_path / "t.gguf"
    bad.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + bytes(10))
    with pytest.raises(CorruptFileError, match="corrupt or truncated"):
        read_metadata(bad)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
def test_find_decoder_is_generic(arch):
    lm = make_tiny_model(arch)
    layout = find_decoder(lm.model)
    assert layout.layers_path == "model.layers" and len(layout) == 2
    assert set(layout.linear_names) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }


def test_unsupported_architecture_names_what_was_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ModelError, match=r"GPT2LMHeadModel.*Conv1D"):
        find_decoder(model)
    with pytest.raises(ModelError, match="no list of identical decoder blocks"):
        find_decoder(torch.nn.Sequential(torch.nn.Linear(2, 2)))
