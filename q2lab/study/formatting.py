"""Numbers and cells as report text, shared by the markdown and the HTML renderer.

Table bodies are lists of strings in the small markdown the reports use (``**bold**``,
``*italic*``, ```code```): :mod:`q2lab.study.markdown` writes them as is and
:mod:`q2lab.study.html` converts them, so both reports show the same numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from q2lab.eval.stats import Comparison
from q2lab.study.analysis import (
    GEN_DIVERGENCES,
    GEN_MEASURES,
    benchmark_averages,
    best_cells,
    frontiers,
    generation_measures,
    paired_comparisons,
)
from q2lab.study.compare import format_comparison
from q2lab.study.rows import Cell, ModelResults, ResultRow, higher_is_better, metric_sort_key, parse_rows

MISSING = "–"
MAX_EXAMPLE_CHARS = 400

PAIRED_HEADER = ["Cell", "task metric", "value", "Δ vs reference [95% CI]", "p", "verdict"]
AVERAGE_HEADER = ["Cell", "average [95% CI]", "Δ vs reference [95% CI]", "p", "verdict", "benchmarks"]


# --------------------------------------------------------------------------- numbers
#: The report's note above the cells calibrated on another language than some of their tasks.
LANGUAGE_NOTE = (
    "**Calibration language.** These cells were calibrated on text in another language than "
    "some of their tasks; Hessian-based methods keep less of their gain off the calibration "
    "language, so calibrate on the task's language or a mix (`corpus: [wikitext2, polish]`):"
)


def decimals_for(x: float) -> int:
    """Decimals showing ~3–4 significant digits: 1234.5, 12.35, 1.234, 0.457, 0.0123."""
    a = abs(x)
    if a == 0:
        return 3
    if a >= 100:
        return 1
    if a >= 10:
        return 2
    if a >= 1:
        return 3
    return min(6, 2 - math.floor(math.log10(a)))


def column_decimals(values: Iterable[float | None]) -> int:
    """One precision per column (enough for its smallest value) so numbers line up."""
    present = [decimals_for(v) for v in values if v is not None]
    return max(present) if present else 3


def format_value(row: ResultRow | None, decimals: int, bold: bool = False) -> str:
    """``value [ci_low, ci_high]``; the value alone when there is no CI; ``–`` when missing."""
    value = row.number("value") if row else None
    if row is None or value is None:
        return MISSING
    text = f"{value:.{decimals}f}"
    if bold:
        text = f"**{text}**"
    lo, hi = row.number("ci_low"), row.number("ci_high")
    if lo is not None and hi is not None:
        text += f" [{lo:.{decimals}f}, {hi:.{decimals}f}]"
    return text


def fmt(x: float | None, digits: int = 3) -> str:
    """A plain number, ``–`` when missing."""
    return MISSING if x is None else f"{x:.{digits}f}"


def arrow(hib: bool) -> str:
    return "↑" if hib else "↓"


def metric_header(mr: ModelResults, task: str, metric: str) -> str:
    """``acc_norm ↑``."""
    return f"{metric} {arrow(mr.direction(task, metric))}"


# --------------------------------------------------------------------------- cells and columns
def cell_name(cell: Cell, flagged: set[str] | frozenset[str] = frozenset()) -> str:
    """The cell's label, ``(reference)`` for the reference, ``†`` when flagged (dissociation)."""
    name = f"{cell.label} (reference)" if cell.is_reference else cell.label
    return name + (" †" if cell.id in flagged else "")


def fmt_bpw(cell: Cell) -> str:
    return MISSING if cell.bpw is None else f"{cell.bpw:.3f}"


def fmt_size(n: int | None) -> str:
    return MISSING if n is None else f"{n / 2**20:.1f} MiB"


def format_shares(formats: dict[str, float]) -> str:
    """``Q4_0 75 %, Q2_K 25 %``: what the quantized linears are stored as, by share of weights
    (a llama.cpp "Q2_K" on rows that are not multiples of 256 is mostly Q4_0)."""
    if not formats:
        return MISSING
    return ", ".join(f"{k} {100 * v:.0f} %" for k, v in formats.items())


def column_headers(mr: ModelResults, cols: Sequence[tuple[str, str]]) -> list[str]:
    """Short headers (``wikitext2 ppl ↓``); the full task name only where short ones collide."""
    short = [_short_header(t, m) for t, m in cols]
    names = [s if short.count(s) == 1 else f"{t} {m}" for s, (t, m) in zip(short, cols)]
    return [f"{n} {arrow(mr.direction(t, m))}" for n, (t, m) in zip(names, cols)]


def _short_header(task: str, metric: str) -> str:
    """`wikitext2 ppl` for (ppl:wikitext2, ppl); plain `collapse_rate` for (gen:collapse, collapse_rate)."""
    name = task.split(":", 1)[-1]
    return metric if metric.startswith(name) else f"{name} {metric}"


def metric_cells(mr: ModelResults, cells: Sequence[Cell], task: str, metric: str) -> list[str]:
    """One formatted column: shared precision, best quantized value in bold."""
    rows = [mr.get(c, task, metric) for c in cells]
    decimals = column_decimals(r.number("value") if r else None for r in rows)
    best = best_cells(mr, task, metric)
    return [format_value(r, decimals, bold=c.id in best) for c, r in zip(cells, rows)]


def main_table_rows(
    mr: ModelResults, cols: Sequence[tuple[str, str]], flagged: set[str]
) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the main table: a row per cell with bpw and the ``cols`` values."""
    header = ["Cell", "bpw", *column_headers(mr, cols)]
    columns = [metric_cells(mr, mr.cells, t, m) for t, m in cols]
    body = [[cell_name(c, flagged), fmt_bpw(c), *(col[i] for col in columns)] for i, c in enumerate(mr.cells)]
    return header, body


def frontier_lines(mr: ModelResults) -> list[str]:
    """Which cells are Pareto-optimal in bpw against each plotted metric."""
    lines = []
    for f in frontiers(mr):
        if f.points:
            names = " → ".join(f"{cell.label} ({bpw:.3f})" for cell, bpw, _ in f.points)
            lines.append(f"- Pareto frontier, bpw vs {f.task} {f.metric}: {names}")
    return lines


# --------------------------------------------------------------------------- paired statistics
def paired_table_rows(mr: ModelResults) -> list[list[str]]:
    """Rows of the paired table (:data:`PAIRED_HEADER`): every quantized cell's compared metrics
    against the reference, paired by unit."""
    body = []
    for p in paired_comparisons(mr):
        d = column_decimals([p.row.number("value"), p.reference_row.number("value")])
        diff, pv, verdict = format_comparison(p.result, d)
        body.append([p.cell.label, f"{p.task} {p.metric}", f"{p.row.value:.{d}f}", diff, pv, verdict])
    return body


def gen_measure_tables(mr: ModelResults) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per gen task, (header, rows) of the continuous generation measures: each cell's collapse
    rate with McNemar's p, every measure's paired Δ vs the reference [95% CI] (``*``: the CI
    excludes 0), and the teacher-forced / free-running KLDs and agreeing tokens with their CIs."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    for g in generation_measures(mr):
        header = ["Cell", "collapse (McNemar p)", *(f"Δ {m}" for m in GEN_MEASURES), *GEN_DIVERGENCES]
        row = [g.cell.label, _collapse_cell(g.collapse_rate, g.collapse)]
        row += [_delta(g.measures[m]) for m in GEN_MEASURES]
        row += [_value_ci(g.divergences[m]) for m in GEN_DIVERGENCES]
        tables.setdefault(g.task, (header, []))[1].append(row)
    return tables


def _collapse_cell(rate: float | None, c: Comparison | None) -> str:
    if rate is None:
        return MISSING
    text = f"{rate:.3f}"
    if c is not None and c.mcnemar is not None:
        text += f" (p {c.mcnemar.p_value:.2g}; {c.mcnemar.a_only}/{c.mcnemar.b_only})"
    return text


def _delta(c: Comparison | None) -> str:
    if c is None:
        return MISSING
    p = c.paired
    d = 3 if max(abs(p.ci_low), abs(p.ci_high)) < 10 else 1
    star = "*" if p.ci_low > 0 or p.ci_high < 0 else ""
    return f"{p.diff:+.{d}f} [{p.ci_low:+.{d}f}, {p.ci_high:+.{d}f}]{star}"


def _value_ci(row: ResultRow | None) -> str:
    if row is None or row.value is None:
        return MISSING
    d = 3 if abs(row.value) < 10 else 1
    return f"{row.value:.{d}f} [{row.ci_low:.{d}f}, {row.ci_high:.{d}f}]"


def average_table_rows(mr: ModelResults) -> list[list[str]]:
    """Rows of the benchmark-average table (:data:`AVERAGE_HEADER`)."""
    body = []
    for a in benchmark_averages(mr):
        names = ", ".join(f"{task.split(':', 1)[-1]} {metric}" for task, metric in a.benchmarks)
        diff = pv = verdict = MISSING
        if a.comparison is not None:
            diff, pv, verdict = format_comparison(a.comparison, 4)
        body.append(
            [cell_name(a.cell), f"{a.value:.4f} [{a.ci_low:.4f}, {a.ci_high:.4f}]", diff, pv, verdict, names]
        )
    return body


# --------------------------------------------------------------------------- provenance
def short(value: Any, limit: int = 80) -> str:
    """A value as at most ``limit`` characters (JSON for non-strings)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def distinct(values: Iterable[Any]) -> list[str]:
    """The distinct non-empty values, shortened, in first-seen order."""
    seen: dict[str, None] = {}
    for v in values:
        if v is not None and v != "" and v != {}:
            seen.setdefault(short(v), None)
    return list(seen)


def _joined(values: list[str]) -> str:
    if not values:
        return MISSING
    text = ", ".join(f"`{v}`" for v in values)
    return text + (" (**differs across cells**)" if len(values) > 1 else "")


_FINGERPRINT_KEYS = ("model_fingerprint", "fingerprint")
_CALIB_KEYS = ("hessian_key", "calibration", "calib")


def _prov_value(row: ResultRow, keys: Sequence[str]) -> Any:
    prov = row.prov
    return next((prov[k] for k in keys if prov.get(k) is not None), None)


def provenance_lines(
    rows: Sequence[Mapping[str, Any] | ResultRow], models: Sequence[ModelResults]
) -> list[str]:
    """Bullet lines summarising where the numbers come from; disagreements are called out."""
    rows = parse_rows(rows)
    lines = [f"- Study: {_joined(distinct(r.study for r in rows))}"]
    for mr in models:
        model_rows = [r for r in rows if r.model_name == mr.model]
        fps = distinct(_prov_value(r, _FINGERPRINT_KEYS) for r in model_rows)
        calib = distinct(_prov_value(r, _CALIB_KEYS) for r in model_rows if not r.of_reference)
        lines.append(f"- Model `{mr.model}`: fingerprint {_joined(fps)}; calibration {_joined(calib)}")
    versions: dict[str, list[Any]] = {}
    for r in rows:
        for pkg, ver in (r.prov.get("versions") or {}).items():
            versions.setdefault(pkg, []).append(ver)
    if versions:
        listed = (f"{pkg} {_joined(distinct(v))}" for pkg, v in sorted(versions.items()))
        lines.append("- Versions: " + "; ".join(listed))
    known = {"versions", "hessians", *_FINGERPRINT_KEYS, *_CALIB_KEYS}  # hessians: summarised as calibration
    other_keys = sorted({k for r in rows for k in r.prov if k not in known})
    for key in other_keys:
        lines.append(f"- {key}: {_joined(distinct(r.prov.get(key) for r in rows))}")
    return lines


def how_to_read(rows: Sequence[Mapping[str, Any] | ResultRow]) -> str:
    """The reading guide, with the direction of every metric that actually appears."""
    directions: dict[str, bool] = {}
    for r in parse_rows(rows):
        directions.setdefault(str(r.metric), higher_is_better(r))
    better = ", ".join(
        f"{m} {arrow(h)}" for m, h in sorted(directions.items(), key=lambda kv: metric_sort_key(kv[0]))
    )
    return (
        "**How to read this.** *bpw* is exact: every stored bit of the quantized linear layers "
        "(codes, scales, zero points, permutations, codebooks) divided by their weight count; "
        "embeddings and lm_head stay in float and are not counted unless a cell says otherwise "
        "(see *quantized fraction*). Brackets are 95% percentile-bootstrap confidence intervals "
        "over the task's independent units (windows, items, prompts). The best quantized value of "
        "each column is **bold**; the float reference is never bold. A cell marked † shows the "
        "MC–generation dissociation (see below). Missing results show as "
        f"{MISSING}. Better is ↑ higher or ↓ lower: {better}."
    )
