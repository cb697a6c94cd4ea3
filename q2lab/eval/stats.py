"""Bootstrap confidence intervals.

Resampling units are the independent units of each task: windows for perplexity and KLD
(tokens inside a window are correlated), items for multiple choice, prompts for generation.
Every interval is a seeded percentile bootstrap, so the same inputs give the same interval.

Beyond one score's CI: :class:`UnitScores` keeps the per-unit numbers behind a record (in its
``details["units"]``), :func:`compare` runs a paired bootstrap (and McNemar's exact test for
accuracies) between two candidates scored on the same units and says whether the difference
is *within noise*, and :func:`benchmark_average` / :func:`paired_average` average several
benchmarks with a stratified bootstrap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from q2lab.errors import ConfigError, DataError, ShapeError

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 1234


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    weights: np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile CI of ``stat`` over units (rows of ``values``).

    ``stat`` maps an index matrix's gathered values ``(n_resamples, n)`` to ``(n_resamples,)``;
    default is the mean.  With ``weights`` the statistic is the weighted mean
    ``Σ v·w / Σ w`` (ratio estimator, e.g. mean token NLL over windows of different lengths).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        v = float(values[0] if weights is None else values[0] / weights[0])
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        stats = values[idx].sum(1) / w[idx].sum(1)
    elif stat is None:
        stats = values[idx].mean(1)
    else:
        stats = stat(values[idx])
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_ci(values, **kw) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, **kw)
    return float(values.mean()) if values.size else float("nan"), lo, hi


# --------------------------------------------------------------------------- per-unit scores
@dataclass(frozen=True)
class UnitScores:
    """The per-unit numbers behind one record, kept so two candidates can be compared item by
    item (a paired test is far more sensitive than comparing two overlapping CIs).

    The record's statistic is ``transform(Σ sums / Σ weights)``: a plain mean when ``weights``
    is None (accuracy: sums are 0/1 per item), a ratio estimator otherwise (mean token NLL over
    windows of different lengths), and ``transform="exp"`` turns mean NLL into perplexity.
    ``ids_sha256`` identifies the units (items, windows, prompts) so that a comparison refuses
    records that were computed on different units.
    """

    sums: np.ndarray
    weights: np.ndarray | None = None
    transform: str = "identity"  # "identity" | "exp"
    ids_sha256: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sums", np.asarray(self.sums, dtype=np.float64).reshape(-1))
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
            if w.shape != self.sums.shape:
                raise ShapeError(f"{w.size} unit weights for {self.sums.size} units")
            object.__setattr__(self, "weights", w)
        if self.transform not in _TRANSFORMS:
            raise ConfigError(f"unknown unit transform {self.transform!r}; known: {sorted(_TRANSFORMS)}")

    @property
    def n(self) -> int:
        return int(self.sums.size)

    @property
    def is_binary(self) -> bool:
        return self.weights is None and bool(np.isin(self.sums, (0.0, 1.0)).all())

    def value(self) -> float:
        return float(self.resampled(np.arange(self.n)[None, :])[0]) if self.n else float("nan")

    def resampled(self, idx: np.ndarray) -> np.ndarray:
        """The statistic for each row of an index matrix ``(n_resamples, n)``."""
        s = self.sums[idx].sum(1)
        w = self.weights[idx].sum(1) if self.weights is not None else np.full(len(idx), idx.shape[1], float)
        return _TRANSFORMS[self.transform](s / w)

    def to_json(self) -> dict[str, Any]:
        """Compact JSON: 0/1 units as a bit string ("0110…"), others as rounded floats."""
        out: dict[str, Any] = {"n": self.n, "transform": self.transform, "ids_sha256": self.ids_sha256}
        if self.is_binary:
            out["bits"] = "".join("1" if v else "0" for v in self.sums)
        else:
            out["sums"] = [float(f"{v:.7g}") for v in self.sums]
            if self.weights is not None:
                out["weights"] = [float(f"{v:.7g}") for v in self.weights]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UnitScores:
        if "bits" in d:
            sums = np.frombuffer(str(d["bits"]).encode("ascii"), dtype=np.uint8) - ord("0")
        elif "sums" in d:
            sums = np.asarray(d["sums"], dtype=np.float64)
        else:
            raise DataError("per-unit scores need 'bits' or 'sums'")
        return cls(sums, d.get("weights"), d.get("transform", "identity"), str(d.get("ids_sha256", "")))


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"identity": lambda x: x, "exp": np.exp}
UNITS_KEY = "units"  # where a record's details keep its UnitScores (as JSON)


def ids_sha256(ids: Sequence[Any]) -> str:
    """Hash of the unit identifiers (item ids, window indices, prompts), in order."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode("utf-8")).hexdigest()[:16]


def units_of(record_or_row: Any) -> UnitScores | None:
    """The UnitScores of a Record or a results.jsonl row, if it carries them."""
    details = record_or_row.get("details") if isinstance(record_or_row, dict) else record_or_row.details
    d = (details or {}).get(UNITS_KEY)
    return UnitScores.from_json(d) if isinstance(d, dict) else None


# --------------------------------------------------------------------------- paired tests
@dataclass(frozen=True)
class PairedResult:
    """``a − b`` on the same units: the observed difference, its CI, a two-sided p-value."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int


def _check_paired(a: UnitScores, b: UnitScores) -> None:
    if a.n != b.n:
        raise ShapeError(f"paired comparison needs the same units: {a.n} vs {b.n}")
    if a.ids_sha256 and b.ids_sha256 and a.ids_sha256 != b.ids_sha256:
        raise DataError("paired comparison of scores computed on different units (ids differ)")
    if a.transform != b.transform:
        raise ConfigError(f"cannot compare a {a.transform} statistic with a {b.transform} one")


def paired_bootstrap(
    a: UnitScores,
    b: UnitScores,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED,
) -> PairedResult:
    """Bootstrap of ``stat(a) − stat(b)`` resampling the *same* units for both.

    Resampling units jointly keeps the item-level correlation (an easy item is easy for both
    models), so the interval of the difference is much narrower than either model's own CI.
    The p-value is the two-sided bootstrap test ``2·min(P(d* ≤ 0), P(d* ≥ 0))``, clipped to 1.
    """
    _check_paired(a, b)
    diff = a.value() - b.value()
    if a.n < 2:
        return PairedResult(diff, diff, diff, 1.0, a.n)
    idx = np.random.default_rng(seed).integers(0, a.n, size=(n_resamples, a.n))
    d = a.resampled(idx) - b.resampled(idx)
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return PairedResult(float(diff), float(lo), float(hi), p, a.n)


@dataclass(frozen=True)
class McNemarResult:
    """Discordant pairs (``a_only``: a right, b wrong; ``b_only``: the reverse) and the exact
    two-sided binomial p-value of McNemar's test."""

    a_only: int
    b_only: int
    p_value: float


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> McNemarResult:
    """Exact McNemar test: under H0 each discordant item is a fair coin flip.

    ``p = min(1, 2·P(X ≤ min(n01, n10)))`` with ``X ~ Binomial(n01 + n10, 1/2)``, computed in
    log space, so it is exact for any number of items (the χ² approximation is poor below
    ~25 discordant pairs, which is the usual case for close quantized models).
    """
    a = np.asarray(a_correct, dtype=bool).reshape(-1)
    b = np.asarray(b_correct, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ShapeError(f"McNemar needs the same items: {a.size} vs {b.size}")
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    return McNemarResult(n01, n10, binomial_two_sided(min(n01, n10), n01 + n10))


def binomial_two_sided(k: int, n: int) -> float:
    """``min(1, 2·P(X ≤ k))`` for ``X ~ Binomial(n, 1/2)`` and ``k ≤ n/2``."""
    if n == 0:
        return 1.0
    j = np.arange(0, k + 1)
    log_terms = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in j])
    log_terms -= n * math.log(2)
    peak = log_terms.max()
    return float(min(1.0, 2 * math.exp(peak) * np.exp(log_terms - peak).sum()))


WITHIN_NOISE = "within noise"


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of candidate ``a`` against ``b`` and its verdict.

    ``verdict`` is ``"within noise"`` when the paired CI of the difference contains 0 (and,
    for accuracies, McNemar's p ≥ alpha): the two numbers are not distinguishable on these
    items, as the 11B study's 71.92 % vs 72.07 %.  Otherwise ``"better"`` or ``"worse"``
    (for ``a``, in the metric's direction).
    """

    paired: PairedResult
    mcnemar: McNemarResult | None
    verdict: str
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        d = {"verdict": self.verdict, **dataclasses.asdict(self.paired)}
        if self.mcnemar is not None:
            d["mcnemar"] = dataclasses.asdict(self.mcnemar)
        return d


def compare(
    a: UnitScores,
    b: UnitScores,
    higher_is_better: bool,
    *,
    alpha: float = 0.05,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Comparison:
    """Paired bootstrap (every metric) plus McNemar (0/1 units) of ``a`` against ``b``."""
    paired = paired_bootstrap(a, b, n_resamples=n_resamples, alpha=alpha, seed=seed)
    mc = mcnemar(a.sums > 0.5, b.sums > 0.5) if a.is_binary and b.is_binary else None
    significant = not (paired.ci_low <= 0 <= paired.ci_high) and (mc is None or mc.p_value < alpha)
    if not significant:
        verdict = WITHIN_NOISE
    else:
        verdict = "better" if (paired.diff > 0) == higher_is_better else "worse"
    return Comparison(paired, mc, verdict, higher_is_better)


# --------------------------------------------------------------------------- multi-benchmark averages
def benchmark_average(
    tasks: Sequence[UnitScores],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Unweighted mean over benchmarks (each counts once, as leaderboards average them) with a
    stratified bootstrap CI: every benchmark's units are resampled within that benchmark."""
    if not tasks:
        return float("nan"), float("nan"), float("nan")
    value = float(np.mean([t.value() for t in tasks]))
    draws = _stratified(tasks, n_resamples, seed).mean(0)
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return value, float(lo), float(hi)


def paired_average(
    a: Sequence[UnitScores],
    b: Sequence[UnitScores],
    higher_is_better: bool = True,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    alpha: float = 0.05,
    seed: int = DEFAULT_SEED,
) -> Comparison:
    """Paired comparison of two candidates' benchmark averages over the same benchmarks and
    items (stratified joint resampling), with the same verdict rule as :func:`compare`."""
    if len(a) != len(b) or not a:
        raise ShapeError(f"benchmark averages need the same non-empty list of tasks: {len(a)} vs {len(b)}")
    for x, y in zip(a, b):
        _check_paired(x, y)
    diff = float(np.mean([x.value() for x in a]) - np.mean([y.value() for y in b]))
    d = (_stratified(a, n_resamples, seed) - _stratified(b, n_resamples, seed)).mean(0)
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    paired = PairedResult(diff, float(lo), float(hi), p, sum(x.n for x in a))
    within = lo <= 0 <= hi
    verdict = WITHIN_NOISE if within else ("better" if (diff > 0) == higher_is_better else "worse")
    return Comparison(paired, None, verdict, higher_is_better)


def _stratified(tasks: Sequence[UnitScores], n_resamples: int, seed: int) -> np.ndarray:
    """``(n_tasks, n_resamples)`` resampled statistics; task ``i`` uses the stream ``(seed, i)``
    so the same seed gives identical index matrices for two candidates (a paired resample)."""
    out = np.empty((len(tasks), n_resamples))
    for i, t in enumerate(tasks):
        rng = np.random.default_rng([seed, i])
        out[i] = t.resampled(rng.integers(0, max(t.n, 1), size=(n_resamples, max(t.n, 1))))
    return out
