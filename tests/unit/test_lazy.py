"""Out-of-core models (q2lab.models.lazy): blocks read from disk one at a time give the same
Hessians and the same quantized checkpoint as the model held in memory, and hold no block
outside the step that needs it."""

from __future__ import annotations

import json

import pytest
import torch

from q2lab import api
from q2lab.errors import ConfigError, CorruptFileError, ModelError
from q2lab.models import load_model
from q2lab.models.arch import find_decoder
from q2lab.models.lazy import is_lazy, resident
from q2lab.utils.tensorfile import INDEX, SafetensorsFiles
from tests.tiny import make_tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7, 250, 31]])


def _save(lm, path, shard="40KB"):
    lm.model.save_pretrained(path, max_shard_size=shard)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    lm = make_tiny_model("llama", seed=3, tie_word_embeddings=request.param)
    return _save(lm, tmp_path_factory.mktemp("lazy-src"))


def _calib(lm, corpus, root):
    return api.calibrate(lm, corpus=str(corpus), windows=4, ctx=32, out=root)


def test_blocks_stay_on_disk_until_a_step_reads_them(model_dir):
    assert (model_dir / INDEX).exists()  # the fixture is sharded: reads cross files
    lm = load_model(model_dir, lazy=True)
    layout = find_decoder(lm.model)
    assert is_lazy(lm.model)
    assert all(p.is_meta for p in layout.layers.parameters())
    assert not lm.model.get_input_embeddings().weight.is_meta
    eager = load_model(model_dir)
    with resident(lm.model, 1):
        got = dict(layout.layers[1].named_parameters())
        want = dict(find_decoder(eager.model).layers[1].named_parameters())
        assert got.keys() == want.keys()
        for k in got:
            assert torch.equal(got[k], want[k]), k
    assert all(p.is_meta for p in layout.layers[1].parameters())


def test_lazy_hessians_equal_in_memory_ones(model_dir, tiny_text_file, tmp_path):
    lazy = _calib(load_model(model_dir, lazy=True), tiny_text_file, tmp_path / "a")
    eager = _calib(load_model(model_dir), tiny_text_file, tmp_path / "b")
    assert lazy.key == eager.key  # same model content, same store
    assert lazy.linears.keys() == eager.linears.keys()
    for name in eager.linears:
        h1, h2 = lazy.hessian(name), eager.hessian(name)
        assert h1.n == h2.n and torch.equal(h1.xtx, h2.xtx), name


@pytest.mark.parametrize(
    "method,options",
    [
        ("gptq", {"bits": 3, "group_size": 32}),
        ("rtn", {"bits": 2}),
        ("llamacpp", {"file_type": "Q4_K_M", "imatrix": True}),  # a per-linear plan, an imatrix
    ],
)
def test_streamed_checkpoint_equals_in_memory_checkpoint(
    model_dir, tiny_text_file, tmp_path, method, options
):
    store = _calib(load_model(model_dir), tiny_text_file, tmp_path / "store")
    common = dict(calib=store.path, corpus=str(tiny_text_file), windows=4, ctx=32)
    lazy_lm = load_model(model_dir, lazy=True)
    api.quantize(lazy_lm, method, options, out=tmp_path / "streamed", **common)
    # the quantized blocks were written and dropped, not kept
    assert all(b.is_meta for b in find_decoder_blocks_buffers(lazy_lm))
    api.quantize(str(model_dir), method, options, out=tmp_path / "whole", **common)
    manifest = json.loads((tmp_path / "streamed" / "q2lab_manifest.json").read_text())
    assert manifest["files"] == ["block_0000.safetensors", "block_0001.safetensors", "model.safetensors"]
    streamed, whole = load_model(tmp_path / "streamed"), load_model(tmp_path / "whole")
    with torch.no_grad():
        assert torch.equal(streamed.model(IDS).logits, whole.model(IDS).logits)


def find_decoder_blocks_buffers(lm):
    return [t for blk in lm.model.model.layers for t in (*blk.parameters(), *blk.buffers())]


def test_whole_model_steps_refuse_a_lazy_model(model_dir, tiny_text_file, tmp_path):
    lm = load_model(model_dir, lazy=True)
    with pytest.raises(ConfigError, match="whole model in memory"):
        api.quantize(
            lm, "quarot", {"bits": 3}, out=tmp_path / "q", corpus=str(tiny_text_file), windows=4, ctx=32
        )
    with pytest.raises(ConfigError, match="give out="):
        api.quantize(str(model_dir), "rtn", {"bits": 4}, lazy=True)
    with pytest.raises(ConfigError, match="evaluation needs the whole model"):
        api.evaluate(lm, ["ppl:wikitext2"])
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_truncated_or_mismatched_files_fail_clearly(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_model(bad, lazy=True)
    with pytest.raises(ModelError, match="no tensor"):
        SafetensorsFiles(model_dir).read("model.layers.99.mlp.up_proj.weight")
    with pytest.raises(ModelError, match="checkpoint"):
        ckpt = tmp_path / "ck"
        api.quantize(str(model_dir), "rtn", {"bits": 4}, out=ckpt)
        load_model(ckpt, lazy=True)


def test_cli_quantize_lazy(model_dir, tmp_path, capsys):
    from q2lab.cli import main

    assert (
        main(
            [
                "quantize",
                str(model_dir),
                "--method",
                "rtn",
                "--bits",
                "4",
                "--lazy",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "rtn" and 4 < out["bpw"] < 5
    assert (tmp_path / "c" / "block_0001.safetensors").exists()


@pytest.mark.parametrize("arch,extra", [("gemma3", {}), ("qwen2", {}), ("mistral", {"sliding_window": 8})])
def test_other_architectures_stream_the_same_checkpoint(arch, extra, tiny_text_file, tmp_path):
    """Per-block call arguments (Gemma 3's local/global layers, Mistral's window), Q/K/V biases
    and Gemma's scaled embeddings survive the meta skeleton."""
    src = _save(make_tiny_model(arch, seed=1, **extra), tmp_path / "src")
    store = _calib(load_model(src, lazy=True), tiny_text_file, tmp_path / "lazy-store")
    eager_store = _calib(load_model(src), tiny_text_file, tmp_path / "store")
    for name in eager_store.linears:
        assert torch.equal(store.hessian(name).xtx, eager_store.hessian(name).xtx), name
    common = dict(calib=eager_store.path, corpus=str(tiny_text_file), windows=4, ctx=32)
    api.quantize(load_model(src, lazy=True), "gptq", {"bits": 4}, out=tmp_path / "s", **common)
    api.quantize(str(src), "gptq", {"bits": 4}, out=tmp_path / "w", **common)
    with torch.no_grad():
        a = load_model(tmp_path / "s").model(IDS).logits
        b = load_model(tmp_path / "w").model(IDS).logits
    assert torch.equal(a, b)


STREAMED = ["quip#", "qtip", "vptq", "butterfly", "q4_k", "mixed"]  # aqlm: as vptq, 14 s more
WHOLE_MODEL = ["quarot", "spinquant", "auto", "upq"]


@pytest.fixture(scope="module")
def contract_dir(tmp_path_factory, tiny_text_file):
    """The method contract's tiny Llama (rows of 256) as a folder, with its store."""
    from tests.unit.test_method_contract import CKPT_MODEL

    folder = _save(make_tiny_model("llama", seed=2, **CKPT_MODEL), tmp_path_factory.mktemp("contract"))
    store = _calib(load_model(folder), tiny_text_file, tmp_path_factory.mktemp("contract-store"))
    return folder, dict(calib=store.path, corpus=str(tiny_text_file), windows=4, ctx=32)


@pytest.mark.parametrize("name", STREAMED)
def test_block_local_methods_stream(name, contract_dir, tmp_path):
    from tests.unit.test_method_contract import EXAMPLE_OPTIONS

    folder, common = contract_dir
    options = EXAMPLE_OPTIONS.get(name, {})
    api.quantize(load_model(folder, lazy=True), name, options, out=tmp_path / "s", **common)
    api.quantize(str(folder), name, options, out=tmp_path / "w", **common)
    with torch.no_grad():
        a = load_model(tmp_path / "s").model(IDS).logits
        b = load_model(tmp_path / "w").model(IDS).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_whole_model_methods_refuse_to_stream(name, contract_dir, tmp_path):
    from tests.unit.test_method_contract import EXAMPLE_OPTIONS

    folder, common = contract_dir
    with pytest.raises(ConfigError, match="whole model in memory"):
        api.quantize(
            load_model(folder, lazy=True), name, EXAMPLE_OPTIONS.get(name, {}), out=tmp_path / "s", **common
        )
    assert not (tmp_path / "s").exists()
