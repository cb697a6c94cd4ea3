"""Paired statistics: bootstrap of differences, McNemar, within-noise verdicts, benchmark averages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from q2lab.errors import DataError, ShapeError
from q2lab.eval import stats
from q2lab.eval.stats import UnitScores


def bern(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


# --------------------------------------------------------------------------- UnitScores
def test_unit_scores_round_trip_and_statistics():
    acc = UnitScores(np.array([1, 0, 1, 1.0]), ids_sha256="abc")
    d = acc.to_json()
    assert d["bits"] == "1011" and "sums" not in d  # 0/1 units stored compactly
    back = UnitScores.from_json(d)
    assert back.value() == pytest.approx(0.75) and back.ids_sha256 == "abc" and back.is_binary
    nll = UnitScores([10.0, 30.0], [5.0, 10.0], "exp")  # ratio estimator, then exp (perplexity)
    assert nll.value() == pytest.approx(math.exp(40 / 15))
    assert UnitScores.from_json(nll.to_json()).value() == pytest.approx(nll.value(), rel=1e-6)
    with pytest.raises(ShapeError):
        UnitScores([1.0, 2.0], [1.0])
    with pytest.raises(DataError):
        UnitScores.from_json({"n": 2})


# --------------------------------------------------------------------------- McNemar
def test_mcnemar_exact_small_counts():
    # 6 discordant items all favouring b: p = 2 · 0.5^6 (the textbook exact value)
    a = np.array([0] * 6 + [1] * 10, dtype=bool)
    b = np.ones(16, dtype=bool)
    r = stats.mcnemar(a, b)
    assert (r.a_only, r.b_only) == (0, 6)
    assert r.p_value == pytest.approx(2 * 0.5**6)
    assert stats.mcnemar(a, a).p_value == 1.0  # no discordant pairs


@pytest.mark.parametrize(("k", "n"), [(0, 1), (3, 10), (12, 40), (480, 1000), (5, 5000)])
def test_binomial_two_sided_matches_closed_form(k, n):
    exact = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # big-integer arithmetic
    assert stats.binomial_two_sided(k, n) == pytest.approx(min(1.0, exact), rel=1e-9, abs=1e-300)


def test_mcnemar_matches_scipy_binomtest():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = bern(0.7, 300, 1).astype(bool), bern(0.66, 300, 2).astype(bool)
    r = stats.mcnemar(a, b)
    ref = scipy_stats.binomtest(r.a_only, r.a_only + r.b_only, 0.5).pvalue
    assert r.p_value == pytest.approx(ref, rel=1e-9)


# --------------------------------------------------------------------------- paired bootstrap
def test_identical_candidates_are_within_noise():
    a = UnitScores(bern(0.7, 200, 0))
    c = stats.compare(a, a, higher_is_better=True)
    assert c.verdict == stats.WITHIN_NOISE and c.paired.diff == 0 and c.paired.p_value == 1.0


def test_paired_test_sees_a_small_consistent_gain_that_separate_cis_cannot():
    """b is a with 12 of 400 wrong items fixed: a 3-point gain.  The two separate CIs overlap
    (±4.5 points each), but every discordant item favours b, so the paired test is decisive."""
    a = bern(0.6, 400, 3)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1
    hi_a = stats.mean_ci(a)[2]
    lo_b = stats.mean_ci(b)[1]
    assert lo_b < hi_a  # the unpaired intervals overlap
    c = stats.compare(UnitScores(b), UnitScores(a), higher_is_better=True)
    assert c.verdict == "better" and c.paired.ci_low > 0
    assert c.mcnemar is not None and (c.mcnemar.a_only, c.mcnemar.b_only) == (12, 0)
    assert c.mcnemar.p_value < 0.001
    assert stats.compare(UnitScores(a), UnitScores(b), True).verdict == "worse"
    # lower-is-better metrics flip the verdict's direction
    assert stats.compare(UnitScores(b), UnitScores(a), higher_is_better=False).verdict == "worse"


def test_paired_refuses_different_units():
    with pytest.raises(ShapeError):
        stats.paired_bootstrap(UnitScores(np.ones(3)), UnitScores(np.ones(4)))
    with pytest.raises(DataError):
        stats.paired_bootstrap(UnitScores(np.ones(3), ids_sha256="x"), UnitScores(np.ones(3), ids_sha256="y"))


def test_paired_ci_covers_the_true_difference():
    """Coverage: over 200 simulated item sets the 95% paired CI contains the true gap ≈ 95% of
    the time (binomial tolerance: 0.89–0.99)."""
    rng = np.random.default_rng(7)
    hits = 0
    for s in range(200):
        easy = rng.random(150)
        a = (easy < 0.70).astype(float)  # true acc 0.70
        b = (easy < 0.65).astype(float)  # true acc 0.65, correlated through item difficulty
        r = stats.paired_bootstrap(UnitScores(a), UnitScores(b), n_resamples=400, seed=s)
        hits += r.ci_low <= 0.05 <= r.ci_high
    assert 0.89 <= hits / 200 <= 0.99


def test_perplexity_difference_uses_the_ratio_estimator():
    tok = np.full(8, 511.0)
    nll_a = np.random.default_rng(0).normal(3.4, 0.1, 8) * tok
    a = UnitScores(nll_a, tok, "exp")
    b = UnitScores(nll_a + 0.2 * tok, tok, "exp")  # 0.2 nats/token worse everywhere
    c = stats.compare(b, a, higher_is_better=False)
    assert c.paired.diff == pytest.approx(b.value() - a.value())
    assert c.verdict == "worse" and c.paired.ci_low > 0 and c.mcnemar is None


# --------------------------------------------------------------------------- benchmark averages
def test_benchmark_average_and_its_stratified_ci():
    tasks = [UnitScores(bern(p, 300, i)) for i, p in enumerate((0.3, 0.5, 0.8))]
    value, lo, hi = stats.benchmark_average(tasks)
    assert value == pytest.approx(np.mean([t.value() for t in tasks]))
    assert lo < value < hi
    # the CI of an average of three ~300-item benchmarks: ≈ ±1.96·sqrt(Σ p(1-p)/n)/3
    se = math.sqrt(sum(t.value() * (1 - t.value()) / t.n for t in tasks)) / 3
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.2)


def test_close_benchmark_averages_are_within_noise_like_the_11b_study():
    """22 benchmarks, two candidates 0.15 points apart on average (71.92 vs 72.07 in the
    study): the paired average test calls it noise."""
    rng = np.random.default_rng(11)
    a, b = [], []
    for _ in range(22):
        easy = rng.random(250)
        right = (easy < 0.72).astype(float)
        a.append(UnitScores(right))
        # 12 items answered differently, half gained half lost: no systematic gap
        flip = np.concatenate([rng.choice(np.flatnonzero(right == v), 6, replace=False) for v in (0, 1)])
        b.append(UnitScores(np.where(np.isin(np.arange(250), flip), 1 - right, right)))
    c = stats.paired_average(a, b, higher_is_better=True)
    assert c.verdict == stats.WITHIN_NOISE and c.paired.ci_low < 0 < c.paired.ci_high
    assert abs(c.paired.diff) < 0.01
