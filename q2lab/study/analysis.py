"""What a study's results say, computed once for every renderer (report.md, pareto.png, report.html).

* which columns a report shows (:func:`headline_columns`, :func:`plot_columns`) and which cells
  are best in a column (:func:`best_cells`);
* the Pareto frontier, fewer bits *and* a better metric (:func:`pareto_frontier`,
  :func:`frontiers`);
* the *MC–generation dissociation*: a cell whose multiple-choice accuracy is statistically
  indistinguishable from the float reference while its free generation collapses
  (:func:`find_dissociations`), and per cell how much of the reference's log-likelihood, MC and
  generation quality it keeps (:func:`retention_rows`);
* paired statistics against the reference on the same items (:func:`paired_comparisons`,
  :func:`benchmark_averages`), computed by :mod:`q2lab.study.compare`;
* cells calibrated on another language than some of their tasks
  (:func:`language_mismatches`).

Everything here reads :class:`~q2lab.study.rows.ModelResults` and returns numbers or records,
never text (except :meth:`Dissociation.describe`, the one sentence both reports print).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from q2lab.calib.store import calibration_language
from q2lab.data.language import uncovered_languages
from q2lab.data.registry import looks_like_path
from q2lab.errors import Q2labError
from q2lab.eval.stats import Comparison
from q2lab.eval.tasks import task_language
from q2lab.study.compare import COMPARED_METRICS, average_of, benchmark_rows, compare_averages, compare_rows
from q2lab.study.rows import Cell, ModelResults, ResultRow, higher_is_better, task_kind

# Headline metrics shown in the main table, in column order within a task.
HEADLINE_METRICS = ("ppl", "kld_mean", "top1_agree", "acc_norm", "collapse_rate", "prompt_strict")
# Metrics plotted against bpw, per task kind, first present wins.
PLOT_METRICS = {"kld": ("kld_mean",), "ppl": ("ppl",), "mc": ("acc_norm", "acc")}
#: Retention (candidate / reference) at or above this on MC (and, in the retention table, on
#: log-likelihood), with generation retention ((1 − collapse) / (1 − reference collapse)) below
#: GEN_COLLAPSED, is a dissociation.
MC_KEPT = 0.95
GEN_COLLAPSED = 0.8
#: ... and the generation loss must be significant: the paired comparison of collapse rates on
#: the same prompts says "worse" (paired bootstrap CI excluding 0 and McNemar's exact p below
#: this).  0 vs 4 collapsed of 8 prompts (p = 0.125) is not a dissociation; 0 vs 8 (p = 0.008) is.
GEN_ALPHA = 0.05


# --------------------------------------------------------------------------- columns
def headline_columns(mr: ModelResults) -> list[tuple[str, str]]:
    """(task, metric) pairs of the main table: headline metrics; ``acc`` when a task has no acc_norm."""
    cols = []
    for task in mr.tasks():
        metrics = mr.metrics(task)
        chosen = [m for m in HEADLINE_METRICS if m in metrics]
        if task_kind(task) == "mc" and "acc_norm" not in metrics and "acc" in metrics:
            chosen.append("acc")
        cols += [(task, m) for m in chosen]
    return cols


def plot_columns(mr: ModelResults) -> list[tuple[str, str]]:
    """(task, metric) pairs worth a panel: KLD mean, perplexity, MC accuracy."""
    cols = []
    for task in mr.tasks():
        wanted = PLOT_METRICS.get(task_kind(task), ())
        metric = next((m for m in wanted if m in mr.metrics(task)), None)
        if metric:
            cols.append((task, metric))
    return cols


def best_cells(mr: ModelResults, task: str, metric: str) -> set[str]:
    """Ids of the non-reference cells with the best value (ties all win)."""
    scored = []
    for cell in mr.quantized:
        row = mr.get(cell, task, metric)
        value = row.number("value") if row else None
        if row is not None and value is not None:
            scored.append((cell.id, value if higher_is_better(row) else -value))
    if not scored:
        return set()
    top = max(s for _, s in scored)
    return {cid for cid, s in scored if math.isclose(s, top, rel_tol=1e-12, abs_tol=0.0)}


# --------------------------------------------------------------------------- Pareto frontier
def pareto_frontier(points: Sequence[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the non-dominated points, by increasing x (bpw): fewer bits and a better y.

    A point is on the frontier when no other point has x ≤ its x and a y at least as good
    with one of the two strictly better.  Of exact duplicates only the first is kept.  Points
    with a non-finite coordinate are ignored.
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(
        (i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)),
        key=lambda i: (points[i][0], -sign * points[i][1], i),
    )
    frontier, best = [], -math.inf
    for i in order:
        score = sign * points[i][1]
        if score > best:
            frontier.append(i)
            best = score
    return frontier


Point = tuple[Cell, float, float]  # (cell, bpw, value)


def plotted_points(mr: ModelResults, task: str, metric: str) -> list[Point]:
    """(cell, bpw, value) of the quantized cells that have both numbers."""
    points = []
    for cell in mr.quantized:
        value = mr.value(cell, task, metric)
        if cell.bpw is not None and value is not None:
            points.append((cell, cell.bpw, value))
    return points


@dataclass(frozen=True)
class Frontier:
    """The Pareto-optimal cells in bpw against one plotted (task, metric), by increasing bpw."""

    task: str
    metric: str
    points: list[Point]


def frontier_of(mr: ModelResults, task: str, metric: str) -> Frontier:
    points = plotted_points(mr, task, metric)
    idx = pareto_frontier([(x, y) for _, x, y in points], mr.direction(task, metric))
    return Frontier(task, metric, [points[i] for i in idx])


def frontiers(mr: ModelResults) -> list[Frontier]:
    """The frontier of every plotted column (possibly empty ones)."""
    return [frontier_of(mr, task, metric) for task, metric in plot_columns(mr)]


# --------------------------------------------------------------------------- dissociation
@dataclass(frozen=True)
class Dissociation:
    """A cell whose MC accuracy matches the reference while its generation collapses."""

    cell: Cell
    collapse: ResultRow
    mc: ResultRow
    reference_mc: ResultRow
    reference_collapse: float | None = None  # shown so a reader can discount a model that loops anyway
    generation: Comparison | None = None  # the paired collapse comparison that made it significant

    def describe(self) -> str:
        lo, hi = self.reference_mc.ci_low, self.reference_mc.ci_high
        ref = "" if self.reference_collapse is None else f" (reference: {self.reference_collapse:.3f})"
        test = ""
        if self.generation is not None and self.generation.mcnemar is not None:
            m = self.generation.mcnemar
            test = (
                f", McNemar p = {m.p_value:.3g} ({m.a_only} prompts collapse only here, "
                f"{m.b_only} only in the reference)"
            )
        return (
            f"**{self.cell.label}** (`{self.cell.id}`): collapse_rate {self.collapse.value:.3f}{ref} on "
            f"{self.collapse.task}{test}, yet {self.mc.task} {self.mc.metric} {self.mc.value:.3f} "
            f"lies inside the reference's 95% CI [{lo:.3f}, {hi:.3f}]."
        )


def mc_metric(mr: ModelResults, task: str) -> str | None:
    """The accuracy an MC task is judged by: acc_norm, else acc."""
    metrics = mr.metrics(task)
    return next((m for m in ("acc_norm", "acc") if m in metrics), None)


def find_dissociations(mr: ModelResults) -> list[Dissociation]:
    """Cells whose generation collapses — retention < GEN_COLLAPSED against the reference's own
    collapse rate *and* significantly worse than the reference on the same prompts
    (:func:`generation_loss`) — while an MC accuracy is inside the reference's CI and ≥ MC_KEPT
    of its value.

    Needs a reference with a CI on the MC task and per-prompt collapse units on both rows;
    without them nothing is flagged (an interval and a test are what make "indistinguishable"
    and "collapsed" statements rather than impressions).
    """
    ref = mr.reference
    if ref is None:
        return []
    gen_tasks = [t for t in mr.tasks() if "collapse_rate" in mr.metrics(t)]
    mc_tasks = [(t, m) for t in mr.tasks() if task_kind(t) == "mc" and (m := mc_metric(mr, t))]
    found = []
    for cell in mr.quantized:
        losses = (
            (r, generation_loss(mr, cell, t)) for t in gen_tasks if (r := mr.get(cell, t, "collapse_rate"))
        )
        collapse, cmp = next(((r, c) for r, c in losses if c is not None), (None, None))
        if collapse is None:
            continue
        ref_collapse = mr.value(ref, collapse.task, "collapse_rate")
        for task, metric in mc_tasks:
            ref_row, row = mr.get(ref, task, metric), mr.get(cell, task, metric)
            if (
                ref_row
                and row
                and inside_ci(row.number("value"), ref_row)
                and mc_retained(row.number("value"), ref_row.number("value"))
            ):
                found.append(Dissociation(cell, collapse, row, ref_row, ref_collapse, cmp))
                break
    return found


def generation_loss(mr: ModelResults, cell: Cell, task: str) -> Comparison | None:
    """The paired comparison of ``cell``'s collapse rate with the reference's on ``task`` when it
    is a generation loss: retention below GEN_COLLAPSED and the comparison says "worse" at
    GEN_ALPHA (McNemar exact p and the paired CI); else None."""
    ref = mr.reference
    row = mr.get(cell, task, "collapse_rate")
    ref_row = mr.get(ref, task, "collapse_rate") if ref is not None else None
    if row is None or ref_row is None or not _collapsed(row):
        return None
    if gen_retention(row.number("value"), ref_row.number("value")) >= GEN_COLLAPSED:
        return None
    cmp = compare_rows(row.to_dict(), ref_row.to_dict())
    if cmp is None or cmp.verdict != "worse":
        return None
    if cmp.mcnemar is not None and cmp.mcnemar.p_value >= GEN_ALPHA:
        return None
    return cmp


def mc_retained(value: float | None, ref_value: float | None) -> bool:
    """MC kept: the point estimate, not only the (at small N, wide) interval, is ≥ MC_KEPT of
    the reference's."""
    return value is not None and bool(ref_value) and value / ref_value >= MC_KEPT  # type: ignore[operator]


def gen_retention(collapse: float | None, ref_collapse: float | None) -> float:
    """Share of the reference's non-collapsed generations the candidate keeps (1 = as good):
    (1 − collapse) / (1 − reference collapse); 1 when unknown or the reference always collapses."""
    base = 1.0 - (ref_collapse or 0.0)
    return 1.0 if collapse is None or base <= 0 else (1.0 - collapse) / base


def inside_ci(value: float | None, ref_row: ResultRow) -> bool:
    """Whether ``value`` lies inside the reference row's confidence interval."""
    lo, hi = ref_row.number("ci_low"), ref_row.number("ci_high")
    return value is not None and lo is not None and hi is not None and lo <= value <= hi


def _collapsed(row: ResultRow | None) -> bool:
    value = row.number("value") if row else None
    return value is not None and value > 0


# --------------------------------------------------------------------------- retention
@dataclass(frozen=True)
class Retention:
    """What a quantized cell keeps of the reference (1.0 = as good), and its generation KLDs."""

    cell: Cell
    ll: float | None  # log-likelihood: mean over ppl tasks of ref ppl / ppl
    mc: float | None  # multiple choice: mean over mc tasks of acc ratio (acc_norm, else acc)
    gen: float | None  # generation: worst gen task's gen_retention
    tf_kld: float | None  # KLD teacher-forced along the reference's generations (first gen task)
    fr_kld: float | None  # KLD along the cell's own free-running generations
    flag: bool  # LL and MC retention ≥ MC_KEPT while generation is a significant loss (generation_loss)


def retention_rows(mr: ModelResults) -> list[Retention]:
    """Per quantized cell: LL / MC / generation retention against the reference, KLDs, flag."""
    ref = mr.reference
    out = []
    for cell in mr.quantized:
        ll = ratio_mean(mr, cell, ref, "ppl", ("ppl",), invert=True)
        mc = ratio_mean(mr, cell, ref, "mc", ("acc_norm", "acc"))
        gen = cell_gen_retention(mr, cell, ref)
        kept = [v for v in (ll, mc) if v is not None]
        gen_tasks = [t for t in mr.tasks() if task_kind(t) == "gen"]
        lost = any(generation_loss(mr, cell, t) is not None for t in gen_tasks)
        flag = bool(kept) and min(kept) >= MC_KEPT and lost
        tf = next((v for t in gen_tasks if (v := mr.value(cell, t, "tf_kld")) is not None), None)
        fr = next((v for t in gen_tasks if (v := mr.value(cell, t, "fr_kld")) is not None), None)
        out.append(Retention(cell, ll, mc, gen, tf, fr, flag))
    return out


def ratio_mean(
    mr: ModelResults,
    cell: Cell,
    ref: Cell | None,
    kind: str,
    metrics: Sequence[str],
    invert: bool = False,
) -> float | None:
    """Mean over the tasks of ``kind`` of cell / reference (reference / cell with ``invert``,
    for lower-is-better metrics) on the first of ``metrics`` a task has; None without any."""
    ratios = []
    for task in (t for t in mr.tasks() if task_kind(t) == kind):
        metric = next((m for m in metrics if m in mr.metrics(task)), None)
        a, b = mr.value(cell, task, metric or ""), mr.value(ref, task, metric or "")
        if a is not None and b:
            ratios.append(b / a if invert and a else a / b)
    return sum(ratios) / len(ratios) if ratios else None


def cell_gen_retention(mr: ModelResults, cell: Cell, ref: Cell | None) -> float | None:
    """The worst :func:`gen_retention` over the gen tasks with a collapse rate; None without any."""
    vals = []
    for task in (t for t in mr.tasks() if task_kind(t) == "gen"):
        c, r = mr.value(cell, task, "collapse_rate"), mr.value(ref, task, "collapse_rate")
        if c is not None:
            vals.append(gen_retention(c, r))
    return min(vals) if vals else None


# --------------------------------------------------------------------------- paired statistics
@dataclass(frozen=True)
class PairedComparison:
    """A quantized cell's headline metric of one task against the reference's, paired by unit."""

    cell: Cell
    task: str
    metric: str
    row: ResultRow
    reference_row: ResultRow
    result: Comparison


def paired_comparisons(mr: ModelResults) -> list[PairedComparison]:
    """Every quantized cell's compared metric (:data:`~q2lab.study.compare.COMPARED_METRICS`) per
    task against the reference, where both rows carry comparable per-unit scores."""
    ref = mr.reference
    if ref is None:
        return []
    out = []
    for cell in mr.quantized:
        for task in mr.tasks():
            metric = next(
                (m for m in COMPARED_METRICS.get(task_kind(task), ()) if m in mr.metrics(task)), None
            )
            row, ref_row = (mr.get(cell, task, metric), mr.get(ref, task, metric)) if metric else (None, None)
            result = compare_rows(row.to_dict(), ref_row.to_dict()) if row and ref_row else None
            if result is None:
                continue
            assert metric is not None and row is not None and ref_row is not None
            out.append(PairedComparison(cell, task, metric, row, ref_row, result))
    return out


#: Continuous generation measures paired with the reference per prompt (record metric names of
#: :func:`q2lab.eval.generation.collapse_records`), in the report's column order.
GEN_MEASURES = ("rep4", "distinct2", "zlib_ratio", "longest_loop", "drift", "echo", "ref_nll")
#: Generation measures that are already a comparison with the reference (its value is 0 / all
#: tokens): shown as the cell's mean with its CI over prompts.
GEN_DIVERGENCES = ("tf_kld", "fr_kld", "agree_tokens")


@dataclass(frozen=True)
class GenMeasures:
    """A quantized cell's continuous generation measures on one gen task: each paired with the
    reference's on the same prompts (None where a row lacks per-prompt scores), and its KLDs."""

    cell: Cell
    task: str
    collapse_rate: float | None
    collapse: Comparison | None
    measures: dict[str, Comparison | None]
    divergences: dict[str, ResultRow | None]


def generation_measures(mr: ModelResults) -> list[GenMeasures]:
    """Every quantized cell's :data:`GEN_MEASURES` against the reference, per gen task whose rows
    carry per-prompt scores (records written before those were kept have none: no entry)."""
    ref = mr.reference
    if ref is None:
        return []
    out = []
    for task in (t for t in mr.tasks() if task_kind(t) == "gen"):
        for cell in mr.quantized:
            measures = {m: _paired(mr, cell, ref, task, m) for m in GEN_MEASURES}
            if not any(measures.values()):
                continue
            divergences = {m: mr.get(cell, task, m) for m in GEN_DIVERGENCES}
            rate = mr.value(cell, task, "collapse_rate")
            collapse = _paired(mr, cell, ref, task, "collapse_rate")
            out.append(GenMeasures(cell, task, rate, collapse, measures, divergences))
    return out


def _paired(mr: ModelResults, cell: Cell, ref: Cell, task: str, metric: str) -> Comparison | None:
    row, ref_row = mr.get(cell, task, metric), mr.get(ref, task, metric)
    return compare_rows(row.to_dict(), ref_row.to_dict()) if row and ref_row else None


@dataclass(frozen=True)
class BenchmarkAverage:
    """A cell's unweighted mean over its MC benchmarks, with a stratified-bootstrap CI, and the
    paired comparison with the reference's mean over the same benchmarks (None for the
    reference itself, or when the benchmarks do not match)."""

    cell: Cell
    value: float
    ci_low: float
    ci_high: float
    benchmarks: list[tuple[str, str]]  # (task, metric) averaged
    comparison: Comparison | None


def benchmark_averages(mr: ModelResults) -> list[BenchmarkAverage]:
    """Every cell with at least two MC benchmarks carrying per-unit scores, reference included."""
    ref = mr.reference
    ref_rows = benchmark_rows(_dict_rows(mr, ref)) if ref else []
    out = []
    for cell in mr.cells:
        rows = benchmark_rows(_dict_rows(mr, cell))
        avg = average_of(rows) if len(rows) >= 2 else None
        if avg is None:
            continue
        value, lo, hi = avg
        comparison = compare_averages(rows, ref_rows) if ref is not None and cell is not ref else None
        names = [(str(r["task"]), str(r["metric"])) for r in rows]
        out.append(BenchmarkAverage(cell, value, lo, hi, names, comparison))
    return out


def _dict_rows(mr: ModelResults, cell: Cell) -> dict[str, dict[str, dict]]:
    """The cell's rows as JSON objects, {task: {metric: row}} (what study.compare reads)."""
    return {t: {m: r.to_dict() for m, r in ms.items()} for t, ms in mr.rows_by_task(cell).items()}


# --------------------------------------------------------------------------- calibration language
@dataclass(frozen=True)
class LanguageMismatch:
    """A quantized cell scored on tasks in languages its calibration did not include."""

    cell: Cell
    calibration: str  # the calibration's language(s), "en" or "en+pl"
    corpus: str | None  # the calibration corpus (or mix), as recorded
    tasks: tuple[tuple[str, str], ...]  # (task, its language)

    def describe(self) -> str:
        where = f" ({self.corpus})" if self.corpus else ""
        tasks = ", ".join(f"{t} ({lang})" for t, lang in self.tasks)
        return f"**{self.cell.label}** calibrated on {self.calibration}{where}: {tasks}"


def language_mismatches(mr: ModelResults) -> list[LanguageMismatch]:
    """Quantized cells with a task whose language their calibration did not include.

    Languages come from the rows (``details.lang``, ``details.calib_lang``, written since
    q2lab records them); rows written earlier fall back to the recorded calibration corpus
    and, for named corpora and MC tasks only, the task's registered language — nothing is read
    from disk, so a report of old rows is the same on every machine."""
    found = []
    for cell in mr.quantized:
        rows = {task: row for (cid, task, _), row in mr.rows.items() if cid == cell.id}
        if not rows:
            continue
        first = next(iter(rows.values()))
        hessians = (first.provenance or {}).get("hessians") or {}
        cal = (first.details or {}).get("calib_lang") or calibration_language(hessians, read_files=False)
        missing = tuple(
            (task, lang)
            for task, row in sorted(rows.items())
            if (lang := _row_language(row)) and uncovered_languages(cal, lang)
        )
        if cal and missing:
            found.append(LanguageMismatch(cell, cal, hessians.get("corpus"), missing))
    return found


def _row_language(row: ResultRow) -> str | None:
    lang = (row.details or {}).get("lang")
    if lang or row.details is None or "lang" in row.details:
        return lang
    settings = row.task_settings or {}
    kind, data = settings.get("kind"), str(settings.get("data") or "")
    if kind not in ("ppl", "kld", "mc", "harness") or not data or looks_like_path(data):
        return None
    from q2lab.eval.tasks import parse_task

    try:
        return task_language(parse_task(f"{kind}:{data}"))
    except Q2labError:  # an old row naming a task this version no longer knows
        return None
