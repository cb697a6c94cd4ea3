"""Perplexity and KLD against direct computations; the fp16 reference cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from q2lab.data.text import make_windows
from q2lab.eval.likelihood import ReferenceCache, kl_per_token, kld_records, ppl_records, score_windows
from q2lab.eval.stats import bootstrap_ci
from q2lab.quant import make_config
from q2lab.quant.model import quantize_model
from tests.tiny import make_tiny_model


@pytest.fixture(scope="module")
def models():
    ref = make_tiny_model("llama", seed=0)
    cand = make_tiny_model("llama", seed=0)
    quantize_model(cand.model, "rtn", make_config("rtn", {"bits": 2, "group_size": 16}))
    windows = torch.randint(2, len(ref.tokenizer), (6, 24), generator=torch.Generator().manual_seed(0))
    return ref, cand, windows


def test_ppl_equals_a_direct_computation(models):
    ref, _, windows = models
    stats = score_windows(ref.model, windows)
    with torch.no_grad():
        logits = ref.model(windows).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1), reduction="mean"
    )
    rec = ppl_records("ppl:t", stats, {})[0]
    assert rec.value == pytest.approx(math.exp(float(nll)), rel=1e-6)
    assert rec.ci_low <= rec.value <= rec.ci_high and rec.n == 6
    assert sum(stats.tokens) == 6 * 23


def test_kld_is_zero_against_itself_and_positive_otherwise(models):
    ref, cand, windows = models
    same = kld_records("kld:t", score_windows(ref.model, windows, ref.model), {})
    by = {r.metric: r.value for r in same}
    assert by["kld_mean"] == pytest.approx(0.0, abs=1e-7) and by["top1_agree"] == 1.0
    diff = {r.metric: r for r in kld_records("kld:t", score_windows(cand.model, windows, ref.model), {})}
    assert diff["kld_mean"].value > 1e-3 and diff["kld_p99"].value >= diff["kld_median"].value
    assert diff["kld_mean"].ci_low <= diff["kld_mean"].value <= diff["kld_mean"].ci_high
    assert not diff["kld_mean"].higher_is_better and diff["top1_agree"].higher_is_better


def test_kl_per_token_closed_form():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    got = kl_per_token(p.log(), q.log())
    assert float(got) == pytest.approx(math.log(2.0))  # zero-mass reference tokens contribute 0


def test_reference_cache_matches_lockstep(models, tmp_path):
    ref, cand, windows = models
    cache = ReferenceCache.build(ref.model, windows, tmp_path / "ref.f16", key="k")
    lock = score_windows(cand.model, windows, ref.model)
    cached = score_windows(cand.model, windows, cache)
    a = np.concatenate(lock.kld)
    b = np.concatenate(cached.kld)
    assert np.allclose(a, b, rtol=2e-2, atol=2e-3)
    assert lock.top1 == cached.top1
    again = ReferenceCache.build(ref.model, windows, tmp_path / "ref.f16", key="k")
    assert again.path == cache.path  # reused, not rebuilt


def test_windows_are_deterministic_and_bos_prefixed():
    tokens = torch.arange(100)
    seq = make_windows(tokens, 3, 10)
    assert seq[1].tolist() == list(range(10, 20))
    bos = make_windows(tokens, 2, 10, bos_id=7)
    assert bos[:, 0].tolist() == [7, 7] and bos[1, 1:].tolist() == list(range(9, 18))
    r1 = make_windows(tokens, 5, 10, mode="random", seed=1)
    assert torch.equal(r1, make_windows(tokens, 5, 10, mode="random", seed=1))
    assert not torch.equal(r1, make_windows(tokens, 5, 10, mode="random", seed=2))


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    x = np.random.default_rng(0).normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_ci(x)
    assert (lo, hi) == bootstrap_ci(x) and lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)  # ≈ normal-theory width
