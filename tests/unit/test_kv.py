"""KV-cache quantization (q2lab/quant/kv.py): exact with a float window covering the sequence,
error falling with bits, keys per channel beating per-token grouping on outlier channels, the
stored bytes per token against their closed form, batch-row selection, bad input."""

from __future__ import annotations

import pytest
import torch

from q2lab.errors import ConfigError
from q2lab.quant.kv import (
    KVConfig,
    cache_nbytes,
    dequantize_keys,
    dequantize_values,
    kivi_cache,
    quantize_keys,
    quantize_values,
)
from q2lab.utils.kvcache import cache_kwargs
from tests.tiny import make_tiny_model

CHUNK = 16


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama")


@torch.no_grad()
def _chunked(model, x: torch.Tensor, cfg: KVConfig):
    """Logits of ``x`` fed in chunks through a quantized cache: later chunks read quantized keys."""
    cache = kivi_cache(model, cfg)
    outs = [
        model(input_ids=x[:, s : s + CHUNK], use_cache=True, **cache_kwargs(model, cache)).logits
        for s in range(0, x.shape[1], CHUNK)
    ]
    return torch.cat(outs, 1), cache


def test_a_float_window_over_the_whole_sequence_is_exact(tiny):
    x = torch.randint(0, 200, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny.model(input_ids=x).logits
    logits, cache = _chunked(tiny.model, x, KVConfig(bits=2, residual=96, group=32))
    assert torch.allclose(logits, ref, atol=1e-5) and cache.get_seq_length() == 96


def test_error_falls_with_bits(tiny):
    x = torch.randint(0, 200, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny.model(input_ids=x).logits
    err = {
        b: float((_chunked(tiny.model, x, KVConfig(bits=b, residual=0, group=16))[0] - ref).abs().max())
        for b in (2, 4, 8)
    }
    assert err[8] < err[4] < err[2] and err[8] < 1e-2


def test_keys_per_channel_beat_per_token_on_outlier_channels():
    """KIVI's reason for grouping keys by channel: a few channels are large for every token."""
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, 32, 64, generator=g)
    keys[..., [3, 17]] *= 20.0
    per_channel = dequantize_keys(quantize_keys(keys, 2), torch.float32)
    per_token = dequantize_values(quantize_values(keys, 2, 32), torch.float32)
    normal = torch.ones(64, dtype=torch.bool)
    normal[[3, 17]] = False

    def err(y: torch.Tensor) -> float:  # per token, each group's step spans its outlier channel
        return float((y - keys)[..., normal].pow(2).mean())

    assert err(per_channel) < 0.5 * err(per_token)


def test_the_grid_spans_each_group_and_need_not_hold_zero():
    """KIVI's grid: a key channel living far from 0 (a large constant part) keeps all 2^b levels
    over its own [min, max]; the extremes are exact up to fp16, and the error is at most half a
    step.  A weight grid forced to hold 0 would spend the 2-bit levels on [0, max]."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 1, 32, 8, generator=g) * 0.1 + 7.0  # every channel in ≈ [6.7, 7.3]
    back = dequantize_keys(quantize_keys(keys, 2), torch.float32)
    lo, hi = keys.amin(dim=-2, keepdim=True), keys.amax(dim=-2, keepdim=True)
    step = (hi - lo) / 3
    assert torch.allclose(back.amin(dim=-2, keepdim=True), lo, atol=5e-3)
    assert ((back - keys).abs() <= step / 2 + 5e-3).all()
    assert len(torch.unique(back[0, 0, :, 0])) == 4  # all four levels used inside the range


def test_stored_bytes_per_token_match_the_format(tiny):
    """After the window flushes, bytes = float window + per token and head: keys d·b/8 plus a
    channel's fp16 step and fp16 minimum per group of g tokens; values d·b/8 plus 4 per group of
    g channels."""
    b, g = 2, 16
    cfg = tiny.model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, layers = cfg.num_key_value_heads, cfg.num_hidden_layers
    x = torch.randint(0, 200, (1, 64), generator=torch.Generator().manual_seed(3))
    _, cache = _chunked(tiny.model, x, KVConfig(bits=b, residual=0, group=g))
    quantized = 64  # 4 whole groups leave the window; none stays float
    keys = quantized * d * b / 8 + (quantized // g) * d * 4
    values = quantized * d * b / 8 + quantized * (d // g) * 4
    assert cache_nbytes(cache) == layers * heads * (keys + values)
    float_bytes = layers * heads * 2 * 64 * d * 4  # the same tokens in a float32 cache
    assert float_bytes / cache_nbytes(cache) > 6  # 8× here: 2-bit codes + 4 bytes per 16 values


def test_batch_rows_select_exactly(tiny):
    x = torch.randint(0, 200, (3, 48), generator=torch.Generator().manual_seed(4))
    _, cache = _chunked(tiny.model, x, KVConfig(bits=2, residual=8, group=16))
    layer = cache.layers[0]
    full_k = torch.cat([dequantize_keys(p, torch.float32) for p in layer.k_blocks] + [layer.keys], -2)
    layer.batch_select_indices(torch.tensor([0, 2]))
    kept = torch.cat([dequantize_keys(p, torch.float32) for p in layer.k_blocks] + [layer.keys], -2)
    assert torch.equal(kept, full_k[[0, 2]]) and layer.get_seq_length() == 48


def test_bad_input_fails_with_one_clear_line():
    with pytest.raises(ConfigError, match=r"kv\.bits must be one of 2, 3, 4, 8"):
        KVConfig(bits=5)
    with pytest.raises(ConfigError, match="unknown kv option"):
        KVConfig.parse({"bits": 2, "window": 4})
    with pytest.raises(ConfigError, match=r"kv\.group must be a positive integer"):
        KVConfig(group=0)
    gemma = make_tiny_model("gemma3")
    with pytest.raises(ConfigError, match="full-attention models only"):
        kivi_cache(gemma.model, KVConfig())


def test_ppl_and_kld_tasks_take_a_quantized_cache(tiny, tiny_text_file):
    from q2lab.eval.tasks import Evaluator, parse_task

    plain = parse_task(f"ppl:{tiny_text_file}", windows=2, ctx=64)
    assert plain.key() == parse_task({"task": f"ppl:{tiny_text_file}", "kv": None}, windows=2, ctx=64).key()
    exact = parse_task(
        {"task": f"ppl:{tiny_text_file}", "kv": {"bits": 2, "residual": 64}}, windows=2, ctx=64
    )
    two = parse_task(
        {"task": f"ppl:{tiny_text_file}", "kv": {"bits": 2, "residual": 0, "group": 16}}, windows=2, ctx=64
    )
    kld = parse_task(
        {"task": f"kld:{tiny_text_file}", "kv": {"bits": 2, "residual": 0, "group": 16}}, windows=2, ctx=64
    )
    ev = Evaluator(tiny)
    base = ev.run(tiny, [plain])[0]
    assert ev.run(tiny, [exact])[0].value == pytest.approx(base.value, rel=1e-5)
    recs = ev.run(make_tiny_model("llama"), [two, kld])  # the same weights, not the reference object
    ppl2 = next(r for r in recs if r.metric == "ppl")
    kl = next(r for r in recs if r.metric == "kld_mean")
    assert ppl2.value != base.value and kl.value > 0  # the fp model against itself: only the cache differs
    info = ppl2.details["kv"]
    assert info["bits"] == 2 and 0 < info["bytes_per_token"] < info["float_bytes_per_token"] / 4
    with pytest.raises(ConfigError, match=r"kv .* applies to ppl, kld and gen"):
        parse_task({"task": "mc:arc_easy", "kv": {"bits": 2}})


def test_task_variants_have_their_own_labels(tiny, tiny_text_file):
    """The same data with and without a quantized cache, or at another ctx, fits in one run:
    each variant's records carry its label ``KIND:DATA@TAG``, and plain tasks keep their keys."""
    from q2lab.eval.tasks import Evaluator, parse_task

    name = f"ppl:{tiny_text_file}"
    plain = parse_task(name, windows=2, ctx=64)
    kv2 = parse_task({"task": name, "kv": {"bits": 2, "residual": 0, "group": 16}}, windows=2, ctx=64)
    long = parse_task({"task": name, "ctx": 128, "tag": "ctx128"}, windows=1)
    assert (plain.label, kv2.label, long.label) == (name, name + "@kv2", name + "@ctx128")
    assert parse_task({"task": name, "tag": None}, windows=2, ctx=64).key() == plain.key()
    records = Evaluator(tiny).run(make_tiny_model("llama"), [plain, kv2, long])
    by_task = {r.task: r for r in records}
    assert set(by_task) == {plain.label, kv2.label, long.label}
    assert by_task[kv2.label].value != by_task[plain.label].value
    assert by_task[long.label].details["ctx"] == 128 and by_task[plain.label].details["ctx"] == 64
    for bad in ("", "a b", "x" * 41, 3):
        with pytest.raises(ConfigError, match="tag must be a short name"):
            parse_task({"task": name, "tag": bad})


PROMPTS = ["The quick brown fox", "All that glitters is not", "Where there is a will"]


def test_generation_through_a_float_window_is_exact(tiny):
    """A residual window longer than prompt + answer never quantizes: the same tokens as the
    plain cache, batched with left padding and rows leaving the batch."""
    from q2lab.eval.generation import generate

    plain = generate(tiny, PROMPTS, 12, batch_size=3)
    window = generate(tiny, PROMPTS, 12, batch_size=3, kv=KVConfig(bits=2, residual=256))
    assert [s.token_ids for s in window] == [s.token_ids for s in plain]


def test_generation_decodes_through_the_quantized_cache(tiny, monkeypatch):
    from q2lab.eval import generation

    made = []

    def spy(model, cfg):
        made.append(kivi_cache(model, cfg))
        return made[-1]

    monkeypatch.setattr(generation, "kivi_cache", spy)
    cfg = KVConfig(bits=2, residual=0, group=4)
    kv_bytes: list[int] = []
    samples = generation.generate(tiny, PROMPTS, 12, batch_size=3, kv=cfg, kv_bytes=kv_bytes)
    assert len(made) == 1 and len(samples) == len(PROMPTS)
    layer = made[0].layers[0]
    assert layer.quantized_tokens >= 4 and layer.k_blocks  # the past was stored in 2 bits
    assert kv_bytes == [cache_nbytes(made[0])] and kv_bytes[0] > 0  # what the batch's cache held


def test_a_peer_cache_is_a_backend_option(tiny, tiny_text_file, monkeypatch):
    """transformers' QuantizedCache is reachable as ``kv.backend`` (how the benchmarks compare
    against it); the default backend stays out of task keys, so older records keep theirs."""
    from q2lab.eval.tasks import parse_task
    from q2lab.quant import kv as kvmod

    assert KVConfig.parse({"bits": 2, "backend": "hqq"}).to_dict() == {
        "bits": 2,
        "residual": 128,
        "group": 32,
        "backend": "hqq",
    }
    assert "backend" not in KVConfig.parse({"bits": 2, "backend": "q2lab"}).to_dict()
    name = f"ppl:{tiny_text_file}"
    ours = parse_task({"task": name, "kv": {"bits": 2}}, windows=2, ctx=64)
    same = parse_task({"task": name, "kv": {"bits": 2, "backend": "q2lab"}}, windows=2, ctx=64)
    peer = parse_task({"task": name, "kv": {"bits": 2, "backend": "quanto"}}, windows=2, ctx=64)
    assert ours.key() == same.key() != peer.key()
    assert (ours.label, peer.label) == (name + "@kv2", name + "@kv2-quanto")
    with pytest.raises(ConfigError, match=r"unknown kv\.backend 'vllm'; known: q2lab, quanto, hqq"):
        KVConfig(backend="vllm")
    with pytest.raises(ConfigError, match=r"kv\.bits must be one of 2, 4 with backend quanto, got 3"):
        KVConfig(bits=3, backend="quanto")
    monkeypatch.setattr(kvmod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"kv\.backend hqq needs the hqq package \(pip install hqq\)"):
        kivi_cache(tiny.model, KVConfig(backend="hqq"))


def test_gen_task_with_kv_shares_the_reference_pass(tiny, monkeypatch):
    """``kv`` quantizes the candidate's cache only: the reference decodes once for the task with
    and without ``kv``, and the candidate decodes through the quantized cache."""
    from q2lab.eval import generation
    from q2lab.eval.tasks import Evaluator, parse_task

    calls = []
    real = generation.generate

    def counting(model, *args, **kwargs):
        calls.append((model is tiny, kwargs.get("kv")))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    plain = parse_task({"task": "gen:collapse", "max_new_tokens": 8, "limit": 3})
    cached = parse_task(
        {"task": "gen:collapse", "max_new_tokens": 8, "limit": 3, "kv": {"bits": 2, "residual": 0}}
    )
    assert cached.key() != plain.key()
    ev = Evaluator(tiny)
    candidate = make_tiny_model("llama")
    records = ev.run(candidate, [plain]) + ev.run(candidate, [cached])
    assert {r.task for r in records} == {"gen:collapse", "gen:collapse@kv2"}
    assert [c for c in calls if c[0]] == [(True, None)]  # the reference: once, float cache
    assert [c[1] for c in calls if not c[0]] == [None, KVConfig(bits=2, residual=0)]


def test_the_reference_through_a_quantized_cache_is_a_candidate(tiny, tiny_text_file):
    """Float weights with a 2-bit cache differ from the reference only by the cache: the
    reference cell gets KLD and generation rows for ``kv`` tasks, and none for plain KLD."""
    from q2lab.eval.tasks import Evaluator, parse_task

    kv = {"bits": 2, "residual": 0, "group": 16}
    kld = parse_task(f"kld:{tiny_text_file}", windows=2, ctx=64)
    kld_kv = parse_task({"task": f"kld:{tiny_text_file}", "kv": kv}, windows=2, ctx=64)
    assert not kld.applies_to(True) and kld_kv.applies_to(True) and kld_kv.applies_to(False)
    ev = Evaluator(tiny)
    (mean,) = [r for r in ev.run(tiny, [kld_kv]) if r.metric == "kld_mean"]
    assert mean.task == kld_kv.label and mean.value > 0
    gen = parse_task({"task": "gen:collapse", "max_new_tokens": 8, "limit": 2, "kv": kv})
    metrics = {r.metric for r in ev.run(tiny, [gen])}
    assert "tf_kld" in metrics or "fr_kld" in metrics  # judged against the float-cache reference


def test_a_study_holds_a_task_with_and_without_the_cache(tiny_text_file):
    from q2lab.study.config import parse_study

    kv = {"bits": 2, "residual": 0}
    raw = {
        "name": "kv",
        "models": ["llama-tiny"],
        "methods": [{"method": "fp"}, {"method": "rtn", "bits": 4}],
        "tasks": [f"ppl:{tiny_text_file}", {"task": f"ppl:{tiny_text_file}", "kv": kv}],
    }
    cfg = parse_study(raw)
    assert [t.label for t in cfg.tasks] == [f"ppl:{tiny_text_file}", f"ppl:{tiny_text_file}@kv2"]
    raw["tasks"].append({"task": f"ppl:{tiny_text_file}", "kv": {**kv, "group": 16}})  # same label
    with pytest.raises(ConfigError, match="each task may appear once"):
        parse_study(raw)
