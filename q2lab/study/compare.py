"""Paired comparisons between cells of a study, from the per-unit scores in its records.

Two overlapping confidence intervals do not mean two models are equal, and two disjoint ones
are a needlessly strict test: the honest question is whether the *difference* on the same
items is distinguishable from zero.  Every record that carries ``details["units"]`` (MC
accuracy, perplexity, KLD, top-1 agreement, collapse rate, IFEval accuracy) can be compared
item by item with :func:`q2lab.eval.stats.compare`; this module does that for every quantized
cell against the reference, and averages the multiple-choice benchmarks into one score with a
stratified CI, as leaderboards do (the 11B study's "71.92 % vs 72.07 %, within noise").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from q2lab.errors import Q2labError
from q2lab.eval.stats import Comparison, UnitScores, benchmark_average, compare, paired_average, units_of

#: Metrics compared against the reference, per task kind, first present wins.
COMPARED_METRICS = {
    "ppl": ("ppl",),
    "kld": ("top1_agree",),
    "mc": ("acc_norm", "acc"),
    "harness": ("acc_norm", "acc"),
    "gen": ("collapse_rate",),
    "ifeval": ("prompt_strict", "prompt_loose"),
}
#: Task kinds whose accuracy enters the benchmark average.
AVERAGED_KINDS = ("mc",)


@dataclass(frozen=True)
class CellComparison:
    """One (task, metric) of a candidate cell against a baseline cell."""

    task: str
    metric: str
    candidate: float
    baseline: float
    result: Comparison


def row_units(row: dict[str, Any] | None) -> UnitScores | None:
    if not row:
        return None
    try:
        return units_of(row)
    except Q2labError:
        return None


def compare_rows(candidate: dict[str, Any], baseline: dict[str, Any]) -> Comparison | None:
    """Paired comparison of two rows of the same task and metric; None if either lacks units
    or their units differ (different items, e.g. another ``limit``)."""
    a, b = row_units(candidate), row_units(baseline)
    if a is None or b is None or a.n != b.n or (a.ids_sha256 and a.ids_sha256 != b.ids_sha256):
        return None
    hib = bool(candidate.get("higher_is_better"))
    return compare(a, b, hib)


def averaged_metric(metrics: list[str]) -> str | None:
    return next((m for m in ("acc_norm", "acc") if m in metrics), None)


def benchmark_rows(rows_by_task: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows (one per MC task, acc_norm else acc) that enter a cell's benchmark average."""
    out = []
    for task in sorted(rows_by_task):
        if task.split(":", 1)[0] not in AVERAGED_KINDS:
            continue
        metric = averaged_metric(sorted(rows_by_task[task]))
        if metric and row_units(rows_by_task[task][metric]) is not None:
            out.append(rows_by_task[task][metric])
    return out


def average_of(rows: list[dict[str, Any]]) -> tuple[float, float, float] | None:
    units = [row_units(r) for r in rows]
    if not units or any(u is None for u in units):
        return None
    return benchmark_average([u for u in units if u is not None])


def compare_averages(candidate: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> Comparison | None:
    """Paired comparison of two benchmark averages over the same tasks (matched by task name)."""
    base = {r["task"]: r for r in baseline}
    pairs = [(r, base[r["task"]]) for r in candidate if r["task"] in base]
    if not pairs or len(pairs) != len(candidate) or len(pairs) != len(baseline):
        return None
    a = [row_units(x) for x, _ in pairs]
    b = [row_units(y) for _, y in pairs]
    if any(u is None for u in a + b) or any(x.n != y.n for x, y in zip(a, b)):  # type: ignore[union-attr]
        return None
    return paired_average(a, b, True)  # type: ignore[arg-type]


def format_comparison(c: Comparison, decimals: int = 3) -> tuple[str, str, str]:
    """(difference [CI], p-value text, verdict) for a table."""
    p = c.paired
    diff = f"{p.diff:+.{decimals}f} [{p.ci_low:+.{decimals}f}, {p.ci_high:+.{decimals}f}]"
    pv = f"{p.p_value:.3f}"
    if c.mcnemar is not None:
        pv += f"; McNemar {c.mcnemar.p_value:.3f} ({c.mcnemar.a_only}/{c.mcnemar.b_only})"
    return diff, pv, c.verdict


def pairwise_table(
    by: dict[tuple[str, str, str, str], dict[str, Any]],
    model: str,
    pairs: list[tuple[str, str]],
    metrics: list[tuple[str, str]],
    *,
    metrics_outer: bool = True,
) -> list[str]:
    """Markdown lines comparing each (a, b) cell pair on each (task, metric) with
    :func:`compare_rows`; ``by`` maps (model, cell, task, metric) to a results row.  Pairs or
    metrics without per-unit scores are left out.  ``metrics_outer``: group by metric, else by
    pair."""
    lines = ["| a | b | metric | a − b [95 % CI] | p | verdict |", "|---|---|---|---|---|---|"]
    combos = (
        [(pair, m) for m in metrics for pair in pairs]
        if metrics_outer
        else [(pair, m) for pair in pairs for m in metrics]
    )
    for (a, b), (task, metric) in combos:
        ra, rb = by.get((model, a, task, metric)), by.get((model, b, task, metric))
        cmp = compare_rows(ra, rb) if ra and rb else None
        if cmp is None:
            continue
        diff, pv, verdict = format_comparison(cmp)
        name_a, name_b = (f"{r['label']} ({r['bpw']:.3f} bpw)" for r in (ra, rb))  # type: ignore[index]
        lines.append(f"| {name_a} | {name_b} | {metric} | {diff} | {pv} | {verdict} |")
    return lines
