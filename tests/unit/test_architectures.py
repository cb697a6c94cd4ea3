"""Architectures beyond Llama on tiny in-process models: Mistral (sliding window), Qwen3 (Q/K
norms), Phi-3 (fused QKV and gate/up projections) and two mixtures of experts (Mixtral,
Qwen3-MoE) — decoder discovery, per-expert Hessians (with the fallback for starved experts),
every registered method through a checkpoint round trip, and GGUF export into llama.cpp."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from q2lab.calib import capture
from q2lab.calib.store import CalibSpec, calibrate
from q2lab.errors import ConfigError, ModelError
from q2lab.models.arch import ExpertMLP, UnfusedExperts, find_decoder, prepare_model
from q2lab.quant.base import get_quantizer, method_names
from tests.oracles import needs_llamacpp
from tests.tiny import TINY_TEXT, make_tiny_model, tiny_config
from tests.unit.test_method_contract import CKPT_MODEL, check_checkpoint, example_config

MOE = dict(num_experts_per_tok=2)
ARCHS: dict[str, dict] = {
    "mistral": dict(sliding_window=8),  # the 16- and 32-token windows below cross it
    "qwen3": dict(head_dim=64),
    "phi3": dict(pad_token_id=1),
    "mixtral": dict(num_local_experts=4, **MOE),
    "qwen3_moe": dict(
        head_dim=64,
        num_experts=4,
        moe_intermediate_size=256,  # K and IQ types need rows of 256
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **MOE,
    ),
}
ATTN = {f"self_attn.{p}_proj" for p in "qkvo"}
MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
EXPERTS = {f"mlp.experts.{e}.{p}_proj" for e in range(4) for p in ("gate", "up", "down")}
LINEARS = {
    "mistral": ATTN | MLP,
    "qwen3": ATTN | MLP,
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "mixtral": ATTN | EXPERTS,
    "qwen3_moe": ATTN | EXPERTS,
}
# (method, arch) → the one-line error that stops it there (checked, so support arriving shows up):
# Every method runs on every architecture here (the rotations through their own norm plans for
# Phi-3's fused projections and MoE routers and experts; llama.cpp's file types with experts
# stacked into 3-D tensors as llama.cpp stores them).
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str]] = {}


def tiny(arch: str, **extra):
    return make_tiny_model(arch, **{**CKPT_MODEL, **ARCHS[arch], **extra})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One Hessian store per architecture (lazily, as the tests ask)."""
    root = tmp_path_factory.mktemp("archs")
    corpus = root / "calib.txt"
    corpus.write_text(TINY_TEXT * 30, encoding="utf-8")
    made: dict[str, object] = {}

    def get(arch: str):
        if arch not in made:
            spec = CalibSpec(corpus=str(corpus), windows=4, ctx=32)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                made[arch] = calibrate(tiny(arch), spec, root=root)
            moe = any("MoE experts" in str(w.message) for w in caught)
            assert moe == (arch in ("mixtral", "qwen3_moe")), [str(w.message) for w in caught]
        return made[arch]

    return get


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decoder_linears(arch):
    layout = find_decoder(tiny(arch).model)
    assert layout.layers_path == "model.layers" and len(layout) == 1
    assert set(layout.linear_names) == LINEARS[arch]  # routers stay float: never listed


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_unfused_experts_compute_the_transformers_model(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fused = AutoModelForCausalLM.from_config(tiny_config(arch, **CKPT_MODEL, **ARCHS[arch])).eval()
    ids = torch.randint(0, fused.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fused(ids).logits
        with pytest.raises(ModelError, match=r"fused 3-D tensors.*prepare_model"):
            find_decoder(fused)
        prepare_model(fused)
        experts = fused.model.layers[0].mlp.experts
        assert isinstance(experts, UnfusedExperts) and len(experts) == 4 and isinstance(experts[0], ExpertMLP)
        torch.testing.assert_close(fused(ids).logits, ref, rtol=1e-5, atol=1e-5)
        experts.dense = frozenset({0, 2})  # dense experts add 0 × output where they were not chosen
        torch.testing.assert_close(fused(ids).logits, ref, rtol=1e-5, atol=1e-5)


def _moe_inputs(lm, window: torch.Tensor):
    """The experts' input tokens and routing of block 0 for one window (float model)."""
    seen = {}
    experts = lm.model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0], idx=args[1]))
    with torch.no_grad():
        lm.model(window)
    handle.remove()
    return seen["x"], seen["idx"]


def test_expert_hessians_are_their_routed_tokens_and_starved_experts_use_all(tmp_path, monkeypatch):
    """Oracle: XᵀX of each expert's routed inputs (gate/up) and of its activations (down),
    recomputed from the block's routing; experts under the threshold get every token's."""
    lm = tiny("mixtral", num_local_experts=8, num_experts_per_tok=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TINY_TEXT * 5, encoding="utf-8")
    monkeypatch.setattr(capture, "MIN_EXPERT_TOKENS", 4)
    with pytest.warns(UserWarning, match=r"MoE experts received fewer than 4 routed tokens"):
        store = calibrate(lm, CalibSpec(corpus=str(corpus), windows=1, ctx=24), root=tmp_path / "h")
    from q2lab.calib.store import calibration_windows

    x, idx = _moe_inputs(lm, calibration_windows(lm, store))
    experts = lm.model.model.layers[0].mlp.experts
    routed = {e: int((idx == e).sum()) for e in range(8)}
    starved = {e for e, k in routed.items() if k < 4}
    assert starved and len(starved) < 8, routed  # both paths are exercised
    assert store.manifest["expert_fallbacks"] == len(starved)
    for e in range(8):
        rows = x if e in starved else x[(idx == e).any(-1)]
        with torch.no_grad():
            z = experts[e].act_fn(experts[e].gate_proj(rows)) * experts[e].up_proj(rows)
        for proj, inp in (("gate", rows), ("up", rows), ("down", z)):
            name = f"model.layers.0.mlp.experts.{e}.{proj}_proj"
            h = store.hessian(name)
            assert h.n == inp.shape[0], (name, h.n)
            torch.testing.assert_close(h.xtx, (inp.double().T @ inp.double()), rtol=1e-4, atol=1e-4)
            assert store.linears[name].get("routed") == (routed[e] if e in starved else None)


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_method_round_trips_a_checkpoint(arch, name, tmp_path, stores):
    """calibrate → quantize with the method → q2lab checkpoint → reload: identical stored tensors
    and logits (the contract's checkpoint check, on this architecture)."""
    q, cfg = get_quantizer(name), example_config(name)
    store = stores(arch) if q.uses_hessian(cfg) or name == "spinquant" else None
    refusal = UNSUPPORTED.get((name, arch))
    if refusal:
        with pytest.raises(refusal[0], match=refusal[1]) as err:
            check_checkpoint(name, tmp_path, store, lm=tiny(arch))
        assert "\n" not in str(err.value)
        return
    check_checkpoint(name, tmp_path, store, lm=tiny(arch))


@needs_llamacpp
@pytest.mark.parametrize("arch", ["mistral", "qwen3", "phi3", "mixtral", "qwen3_moe"])
def test_gguf_export_runs_in_llamacpp(arch, tmp_path):
    """llama.cpp's graph for the architecture on our F32 file gives the model's logits, and our
    Q4_K_M file is byte-equal to llama-quantize's quantization of that F32 file."""
    from q2lab.export.gguf import differing_tensors, export_gguf
    from q2lab.quant.ggml import llamacpp

    # llama.cpp's llama graph has no sliding window; its qwen3moe graph renormalizes the top-k weights
    extra = {"sliding_window": None} if arch in ("mistral", "mixtral") else {}
    extra |= {"norm_topk_prob": True} if arch == "qwen3_moe" else {}
    lm = tiny(arch, num_hidden_layers=2, **extra)
    # llama.cpp sets token attributes of "<unk>", "<s>", "<|endoftext|>" by name in models whose
    # general.name contains "phi3" (a real Phi-3 vocabulary has them; the tiny one does not)
    lm.info.name = "tiny"
    tokens = lm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    with torch.no_grad():
        float_logits = lm.model(torch.tensor([tokens])).logits[0].numpy()
    f32 = tmp_path / "f.gguf"
    export_gguf(lm, f32, "F32")
    assert np.abs(llamacpp.logits(f32, tokens) - float_logits).max() < 1e-3
    ref = tmp_path / "ref.gguf"
    llamacpp.quantize_file(f32, ref, "Q4_K_M", nthread=1)
    export_gguf(lm, tmp_path / "q.gguf", "Q4_K_M")
    assert differing_tensors(ref, tmp_path / "q.gguf") == []


@needs_llamacpp
@pytest.mark.parametrize("file_type", ["Q2_K", "Q3_K_L", "Q4_K_M"])
def test_gguf_recipe_of_an_eight_expert_model_equals_llama_quantize(file_type, tmp_path):
    """With 8 experts llama.cpp bumps attention K/V to Q8_0 and (for most file types) attention
    output to Q5_K, and drops the dense output bumps: our file equals llama-quantize's."""
    from q2lab.export.gguf import differing_tensors, export_gguf
    from q2lab.quant.ggml import llamacpp

    lm = tiny("mixtral", num_hidden_layers=2, num_local_experts=8, sliding_window=None)
    lm.info.name = "tiny"
    f32, ours, ref = tmp_path / "f.gguf", tmp_path / "q.gguf", tmp_path / "ref.gguf"
    export_gguf(lm, f32, "F32")
    llamacpp.quantize_file(f32, ref, file_type, nthread=1)
    report = export_gguf(lm, ours, file_type)
    assert differing_tensors(ref, ours) == []
    types = {t["name"]: t["type"] for t in report["tensors"]}
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == "Q8_0"
    assert types["blk.0.attn_output.weight"] == ("Q3_K" if file_type == "Q3_K_L" else "Q5_K")
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_gguf_export_refuses_what_llamacpp_cannot_run(tmp_path):
    from q2lab.export.gguf import export_gguf

    with pytest.raises(ConfigError, match=r"puts the expert tensor blk\.0\.ffn_\w+_exps\.weight in IQ2_XXS"):
        export_gguf(tiny("mixtral", intermediate_size=256), tmp_path / "m.gguf", "IQ2_XXS")
    with pytest.raises(ConfigError, match="norm_topk_prob = false, which a GGUF cannot express"):
        export_gguf(tiny("qwen3_moe", norm_topk_prob=False), tmp_path / "m.gguf", "F32")
    with pytest.raises(ConfigError, match=r"GGUF export supports .*mixtral.*; this one is 'gpt_neox'"):
        export_gguf(make_tiny_model("gpt_neox"), tmp_path / "n.gguf", "F32")
    assert not any(tmp_path.iterdir())
