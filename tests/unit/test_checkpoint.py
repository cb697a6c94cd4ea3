"""Quantized checkpoints: bit-identical reload, tied weights, and clear errors on damage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from q2lab.errors import CorruptFileError
from q2lab.export.checkpoint import save_checkpoint
from q2lab.models import load_model
from q2lab.models.checkpoint import load_checkpoint
from q2lab.quant import make_config
from q2lab.quant.linear import QuantLinear
from q2lab.quant.model import quantize_model
from tests.tiny import make_tiny_model


@pytest.mark.parametrize("tie", [False, True])
def test_reload_gives_bit_identical_logits(tmp_path, tie):
    lm = make_tiny_model("llama", tie_word_embeddings=tie)
    report = quantize_model(lm.model, "rtn", make_config("rtn", {"bits": 3, "group_size": 32}))
    x = torch.randint(0, len(lm.tokenizer), (2, 16))
    with torch.no_grad():
        before = lm.model(x).logits
    save_checkpoint(lm, tmp_path / "ckpt", report.to_dict())
    loaded = load_model(str(tmp_path / "ckpt"))  # the generic loader recognises checkpoints
    with torch.no_grad():
        after = loaded.model(x).logits
    assert torch.equal(before, after)
    assert loaded.info.kind == "checkpoint"
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    tied = loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert tied == tie
    manifest = json.loads((tmp_path / "ckpt" / "q2lab_manifest.json").read_text())
    assert manifest["quantization"]["bpw"] == pytest.approx(report.bpw)


def test_quantized_checkpoint_is_smaller_than_float(tmp_path):
    lm = make_tiny_model("llama")
    float_bytes = sum(p.numel() * 4 for p in lm.model.parameters())
    quantize_model(lm.model, "rtn", make_config("rtn", {"bits": 2, "group_size": 32}))
    save_checkpoint(lm, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    linear_bytes = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if ".q_" not in k and ("proj." in k)
    )
    assert linear_bytes < 0.2 * float_bytes


def _saved(tmp_path):
    lm = make_tiny_model("llama")
    quantize_model(lm.model, "rtn", make_config("rtn", {"bits": 4}))
    return save_checkpoint(lm, tmp_path / "ckpt")


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    path = _saved(tmp_path)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("q_proj.codes"))
    # wrong shape
    bad = dict(tensors)
    bad[name] = tensors[name][:-1].clone()
    save_file(bad, str(weights))
    with pytest.raises(CorruptFileError, match=r"q_proj.codes is uint8 \[\d+\], expected"):
        load_checkpoint(path)
    # missing tensor
    del bad[name]
    save_file(bad, str(weights))
    with pytest.raises(CorruptFileError, match="is missing"):
        load_checkpoint(path)
    # truncated file
    weights.write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptFileError, match=r"cannot read model\.safetensors"):
        load_checkpoint(path)
    (path / "q2lab_manifest.json").write_text("{")
    with pytest.raises(CorruptFileError, match=r"cannot read q2lab_manifest\.json"):
        load_checkpoint(path)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    lm = make_tiny_model("llama")
    quantize_model(lm.model, "rtn", make_config("rtn", {"bits": 4}))
    import q2lab.export.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json_atomic", boom)
    with pytest.raises(OSError):
        save_checkpoint(lm, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
