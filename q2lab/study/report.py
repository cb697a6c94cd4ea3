"""Turn a study's ``results.jsonl`` into ``report.md`` and ``pareto.png``.

A study writes one JSON object per line: one metric of one task for one grid cell (the
:class:`q2lab.eval.records.Record` fields plus the cell's model, method, bits, label, bpw and
provenance).  This module only reads those rows; it never re-runs anything, so a report can be
rebuilt from the records alone and two reports of the same records are identical.

The report is written for a reader deciding "which method at which size?":

* one main table per model with the headline metric of every task, best quantized value bold;
* the Pareto frontier (fewer bits *and* a better metric), in text and in the plot;
* the *MC–generation dissociation*: a cell whose multiple-choice accuracy is statistically
  indistinguishable from the float reference while its free generation collapses — the case
  the project exists to expose, because MC benchmarks alone would call that cell lossless;
* provenance, so a number in the table can be traced to versions, seeds, data and Hessians.

Both files are rendered in memory first and then moved into place together, so a failure never
leaves a half-written report (or a new report next to a stale plot from a failed run).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q2lab.errors import DataError
from q2lab.utils.io import atomic_path

MISSING = "–"
REPORT_NAME = "report.md"
PLOT_NAME = "pareto.png"
REPORT_FILE_MODE = 0o644  # the staging file comes from mkstemp (0600); a report is meant to be read by others

# Headline metrics shown in the main table, in column order within a task.
HEADLINE_METRICS = ("ppl", "kld_mean", "top1_agree", "acc_norm", "collapse_rate", "prompt_strict")
# Task kinds in the order their columns appear (most sensitive signal first).
TASK_KIND_ORDER = ("kld", "ppl", "mc", "harness", "gen", "ifeval")
# Metric order in detail tables; unknown metrics follow alphabetically.
METRIC_ORDER = (
    "ppl",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "top1_agree",
    "acc_norm",
    "acc",
    "collapse_rate",
    "rep4",
    "distinct2",
    "zlib_ratio",
    "longest_loop",
    "tf_kld",
    "fr_kld",
    "agree_tokens",
    "prompt_strict",
    "prompt_loose",
    "inst_strict",
    "inst_loose",
)
# Direction used when a row does not say (rows normally carry ``higher_is_better``).
DEFAULT_HIGHER_IS_BETTER = {
    "ppl": False,
    "kld_mean": False,
    "kld_median": False,
    "kld_p99": False,
    "top1_agree": True,
    "acc": True,
    "acc_norm": True,
    "collapse_rate": False,
    "rep4": False,
    "distinct2": True,
    "longest_loop": False,
    "tf_kld": False,
    "fr_kld": False,
    "agree_tokens": True,
    "prompt_strict": True,
    "prompt_loose": True,
    "inst_strict": True,
    "inst_loose": True,
}
# Metrics plotted against bpw, per task kind, first present wins.
PLOT_METRICS = {"kld": ("kld_mean",), "ppl": ("ppl",), "mc": ("acc_norm", "acc")}
MAX_EXAMPLES_PER_CELL = 3
MAX_EXAMPLE_CHARS = 400
_REQUIRED_FIELDS = ("cell", "task", "metric")


# --------------------------------------------------------------------------- loading
def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``; blank lines are skipped, bad lines name their number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- model of the rows
@dataclass(frozen=True)
class Cell:
    """One grid cell (a model quantized one way) with the attributes shared by its rows."""

    id: str
    model: str
    method: str
    bits: int | None
    label: str
    bpw: float | None
    is_reference: bool
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    quantized_fraction: float | None = None
    file_size_bytes: int | None = None
    quantize_s: float | None = None
    formats: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def sort_key(self) -> tuple:
        """Reference first, then by method, bits (fp/unknown last), bpw, id."""
        bits = self.bits if self.bits is not None else 1 << 30
        bpw = self.bpw if self.bpw is not None else math.inf
        return (not self.is_reference, self.method, bits, bpw, self.id)


@dataclass
class ModelResults:
    """All rows of one model, indexed by (cell id, task, metric)."""

    model: str
    cells: list[Cell]
    rows: dict[tuple[str, str, str], dict[str, Any]]

    def get(self, cell: Cell, task: str, metric: str) -> dict[str, Any] | None:
        return self.rows.get((cell.id, task, metric))

    @property
    def reference(self) -> Cell | None:
        return next((c for c in self.cells if c.is_reference), None)

    @property
    def quantized(self) -> list[Cell]:
        return [c for c in self.cells if not c.is_reference]

    def tasks(self) -> list[str]:
        return sorted({t for _, t, _ in self.rows}, key=task_sort_key)

    def metrics(self, task: str) -> list[str]:
        return sorted({m for _, t, m in self.rows if t == task}, key=metric_sort_key)


def task_kind(task: str) -> str:
    """``"ppl:wikitext2"`` → ``"ppl"``."""
    return task.split(":", 1)[0]


def task_sort_key(task: str) -> tuple:
    kind = task_kind(task)
    rank = TASK_KIND_ORDER.index(kind) if kind in TASK_KIND_ORDER else len(TASK_KIND_ORDER)
    return (rank, task)


def metric_sort_key(metric: str) -> tuple:
    rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return (rank, metric)


def _first(rows: Iterable[dict[str, Any]], key: str) -> Any:
    """First non-null value of ``key`` among rows (optional fields may be on some rows only)."""
    return next((r[key] for r in rows if r.get(key) is not None), None)


def _model_of(row: dict[str, Any]) -> str:
    if row.get("model"):
        return str(row["model"])
    cell = str(row.get("cell", ""))
    return cell.split("/", 1)[0] if "/" in cell else "model"


def _make_cell(cell_id: str, rows: list[dict[str, Any]]) -> Cell:
    method = str(_first(rows, "method") or "?")
    bpw = _first(rows, "bpw")
    size = _first(rows, "file_size_bytes")
    qfrac = _first(rows, "quantized_fraction")
    timings = _first(rows, "timings")
    quantize_s = timings.get("quantize_s") if isinstance(timings, dict) else None
    quant = _first(rows, "quant")
    formats = quant.get("formats") if isinstance(quant, dict) else None
    return Cell(
        id=cell_id,
        model=_model_of(rows[0]),
        method=method,
        bits=_first(rows, "bits"),
        label=str(_first(rows, "label") or cell_id),
        bpw=None if bpw is None else float(bpw),
        is_reference=bool(_first(rows, "is_reference")) or method == "fp",
        options=_first(rows, "options") or {},
        quantized_fraction=None if qfrac is None else float(qfrac),
        file_size_bytes=None if size is None else int(size),
        quantize_s=None if quantize_s is None else float(quantize_s),
        formats=dict(formats) if isinstance(formats, dict) else {},
    )


def validate_rows(rows: Sequence[dict[str, Any]]) -> None:
    """Fail with the row number when a row lacks what it needs to be placed in a table."""
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"result row {i} is not a JSON object")
        missing = [k for k in _REQUIRED_FIELDS if not row.get(k)]
        if missing:
            raise DataError(f"result row {i} lacks {', '.join(missing)}: {json.dumps(row)[:200]}")


def group_by_model(rows: Sequence[dict[str, Any]]) -> list[ModelResults]:
    """Models in first-seen order; a repeated (cell, task, metric) keeps the last row (a re-run)."""
    validate_rows(rows)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(_model_of(row), []).append(row)
    out = []
    for model, model_rows in by_model.items():
        by_cell: dict[str, list[dict[str, Any]]] = {}
        for row in model_rows:
            by_cell.setdefault(str(row["cell"]), []).append(row)
        cells = sorted((_make_cell(cid, crows) for cid, crows in by_cell.items()), key=Cell.sort_key)
        index = {(str(r["cell"]), str(r["task"]), str(r["metric"])): r for r in model_rows}
        out.append(ModelResults(model, cells, index))
    return out


# --------------------------------------------------------------------------- numbers
def _num(x: Any) -> float | None:
    """A finite float, or None for null/NaN/inf/non-numbers (rendered as missing)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def higher_is_better(row: dict[str, Any]) -> bool:
    hib = row.get("higher_is_better")
    if isinstance(hib, bool):
        return hib
    return DEFAULT_HIGHER_IS_BETTER.get(str(row.get("metric")), False)


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


def format_value(row: dict[str, Any] | None, decimals: int, bold: bool = False) -> str:
    """``value [ci_low, ci_high]``; the value alone when there is no CI; ``–`` when missing."""
    value = _num(row.get("value")) if row else None
    if value is None:
        return MISSING
    text = f"{value:.{decimals}f}"
    if bold:
        text = f"**{text}**"
    lo, hi = _num(row.get("ci_low")), _num(row.get("ci_high"))  # type: ignore[union-attr]
    if lo is not None and hi is not None:
        text += f" [{lo:.{decimals}f}, {hi:.{decimals}f}]"
    return text


def best_cells(mr: ModelResults, task: str, metric: str) -> set[str]:
    """Ids of the non-reference cells with the best value (ties all win)."""
    scored = []
    for cell in mr.quantized:
        row = mr.get(cell, task, metric)
        value = _num(row.get("value")) if row else None
        if row is not None and value is not None:
            scored.append((cell.id, value if higher_is_better(row) else -value))
    if not scored:
        return set()
    top = max(s for _, s in scored)
    return {cid for cid, s in scored if math.isclose(s, top, rel_tol=1e-12, abs_tol=0.0)}


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


# --------------------------------------------------------------------------- markdown helpers
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is a list of 'l'/'r' per column."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(_md_escape(c) for c in line) + " |" for line in lines)


def _arrow(hib: bool) -> str:
    return "↑" if hib else "↓"


def _direction(mr: ModelResults, task: str, metric: str) -> bool:
    row = next((r for (_, t, m), r in mr.rows.items() if t == task and m == metric), {"metric": metric})
    return higher_is_better(row)


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


def column_headers(mr: ModelResults, cols: Sequence[tuple[str, str]]) -> list[str]:
    """Short headers (``wikitext2 ppl ↓``); the full task name only where short ones collide."""
    short = [_short_header(t, m) for t, m in cols]
    names = [s if short.count(s) == 1 else f"{t} {m}" for s, (t, m) in zip(short, cols)]
    return [f"{n} {_arrow(_direction(mr, t, m))}" for n, (t, m) in zip(names, cols)]


def _short_header(task: str, metric: str) -> str:
    """`wikitext2 ppl` for (ppl:wikitext2, ppl); plain `collapse_rate` for (gen:collapse, collapse_rate)."""
    name = task.split(":", 1)[-1]
    return metric if metric.startswith(name) else f"{name} {metric}"


def metric_cells(mr: ModelResults, cells: Sequence[Cell], task: str, metric: str) -> list[str]:
    """One formatted column: shared precision, best quantized value in bold."""
    rows = [mr.get(c, task, metric) for c in cells]
    decimals = column_decimals(_num(r.get("value")) if r else None for r in rows)
    best = best_cells(mr, task, metric)
    return [format_value(r, decimals, bold=c.id in best) for c, r in zip(cells, rows)]


def _fmt_bpw(cell: Cell) -> str:
    return MISSING if cell.bpw is None else f"{cell.bpw:.3f}"


def _fmt_size(n: int | None) -> str:
    return MISSING if n is None else f"{n / 2**20:.1f} MiB"


def _cell_name(cell: Cell, flagged: set[str]) -> str:
    name = f"{cell.label} (reference)" if cell.is_reference else cell.label
    return name + (" †" if cell.id in flagged else "")


# --------------------------------------------------------------------------- dissociation
#: Retention (candidate / reference) at or above this on MC (and, in the HTML retention table, on
#: log-likelihood), with generation retention ((1 − collapse) / (1 − reference collapse)) below
#: GEN_COLLAPSED, is a dissociation.
MC_KEPT = 0.95
GEN_COLLAPSED = 0.8


@dataclass(frozen=True)
class Dissociation:
    """A cell whose MC accuracy matches the reference while its generation collapses."""

    cell: Cell
    collapse: dict[str, Any]
    mc: dict[str, Any]
    reference_mc: dict[str, Any]
    reference_collapse: float | None = None  # shown so a reader can discount a model that loops anyway

    def describe(self) -> str:
        lo, hi = self.reference_mc["ci_low"], self.reference_mc["ci_high"]
        ref = "" if self.reference_collapse is None else f" (reference: {self.reference_collapse:.3f})"
        return (
            f"**{self.cell.label}** (`{self.cell.id}`): collapse_rate {self.collapse['value']:.3f}{ref} on "
            f"{self.collapse['task']}, yet {self.mc['task']} {self.mc['metric']} {self.mc['value']:.3f} "
            f"lies inside the reference's 95% CI [{lo:.3f}, {hi:.3f}]."
        )


def _mc_metric(mr: ModelResults, task: str) -> str | None:
    metrics = mr.metrics(task)
    return next((m for m in ("acc_norm", "acc") if m in metrics), None)


def find_dissociations(mr: ModelResults) -> list[Dissociation]:
    """Cells whose generation collapses (retention < GEN_COLLAPSED against the reference's own
    collapse rate) while an MC accuracy is inside the reference's CI and ≥ MC_KEPT of its value.

    Needs a reference with a CI on the MC task; without one nothing is flagged (an interval
    is what makes "indistinguishable" a statement rather than an impression).
    """
    ref = mr.reference
    if ref is None:
        return []
    gen_tasks = [t for t in mr.tasks() if "collapse_rate" in mr.metrics(t)]
    mc_tasks = [(t, m) for t in mr.tasks() if task_kind(t) == "mc" and (m := _mc_metric(mr, t))]
    found = []
    for cell in mr.quantized:
        collapse = next((r for t in gen_tasks if _collapsed(r := mr.get(cell, t, "collapse_rate"))), None)
        if collapse is None:
            continue
        for task, metric in mc_tasks:
            ref_row, row = mr.get(ref, task, metric), mr.get(cell, task, metric)
            ref_collapse = _value(mr, ref, collapse["task"], "collapse_rate")
            if (
                ref_row
                and row
                and _inside_ci(_num(row.get("value")), ref_row)
                and _retained(_num(row.get("value")), _num(ref_row.get("value")))
                and _gen_retention(_num(collapse.get("value")), ref_collapse) < GEN_COLLAPSED
            ):
                found.append(Dissociation(cell, collapse, row, ref_row, ref_collapse))
                break
    return found


def _retained(value: float | None, ref_value: float | None) -> bool:
    """MC kept: the point estimate, not only the (at small N, wide) interval, is near the reference."""
    return value is not None and bool(ref_value) and value / ref_value >= MC_KEPT  # type: ignore[operator]


def _gen_retention(collapse: float | None, ref_collapse: float | None) -> float:
    """Share of the reference's non-collapsed generations the candidate keeps (1 = as good)."""
    base = 1.0 - (ref_collapse or 0.0)
    return 1.0 if collapse is None or base <= 0 else (1.0 - collapse) / base


def _collapsed(row: dict[str, Any] | None) -> bool:
    value = _num(row.get("value")) if row else None
    return value is not None and value > 0


def _inside_ci(value: float | None, ref_row: dict[str, Any]) -> bool:
    lo, hi = _num(ref_row.get("ci_low")), _num(ref_row.get("ci_high"))
    return value is not None and lo is not None and hi is not None and lo <= value <= hi


# --------------------------------------------------------------------------- provenance
def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _distinct(values: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if v is not None and v != "" and v != {}:
            seen.setdefault(_short(v), None)
    return list(seen)


def _joined(values: list[str]) -> str:
    if not values:
        return MISSING
    text = ", ".join(f"`{v}`" for v in values)
    return text + (" (**differs across cells**)" if len(values) > 1 else "")


_FINGERPRINT_KEYS = ("model_fingerprint", "fingerprint")
_CALIB_KEYS = ("hessian_key", "calibration", "calib")


def _prov(row: dict[str, Any]) -> dict[str, Any]:
    prov = row.get("provenance")
    return prov if isinstance(prov, dict) else {}


def _prov_value(row: dict[str, Any], keys: Sequence[str]) -> Any:
    prov = _prov(row)
    return next((prov[k] for k in keys if prov.get(k) is not None), None)


def provenance_lines(rows: Sequence[dict[str, Any]], models: Sequence[ModelResults]) -> list[str]:
    """Bullet lines summarising where the numbers come from; disagreements are called out."""
    lines = [f"- Study: {_joined(_distinct(r.get('study') for r in rows))}"]
    for mr in models:
        model_rows = [r for r in rows if _model_of(r) == mr.model]
        fps = _distinct(_prov_value(r, _FINGERPRINT_KEYS) for r in model_rows)
        calib = _distinct(_prov_value(r, _CALIB_KEYS) for r in model_rows if not _is_reference_row(r))
        lines.append(f"- Model `{mr.model}`: fingerprint {_joined(fps)}; calibration {_joined(calib)}")
    versions: dict[str, list[Any]] = {}
    for r in rows:
        for pkg, ver in (_prov(r).get("versions") or {}).items():
            versions.setdefault(pkg, []).append(ver)
    if versions:
        listed = (f"{pkg} {_joined(_distinct(v))}" for pkg, v in sorted(versions.items()))
        lines.append("- Versions: " + "; ".join(listed))
    known = {"versions", "hessians", *_FINGERPRINT_KEYS, *_CALIB_KEYS}  # hessians: summarised as calibration
    other_keys = sorted({k for r in rows for k in _prov(r) if k not in known})
    for key in other_keys:
        lines.append(f"- {key}: {_joined(_distinct(_prov(r).get(key) for r in rows))}")
    return lines


def _is_reference_row(row: dict[str, Any]) -> bool:
    return bool(row.get("is_reference")) or row.get("method") == "fp"


# --------------------------------------------------------------------------- report sections
def how_to_read(rows: Sequence[dict[str, Any]]) -> str:
    """The reading guide, with the direction of every metric that actually appears."""
    directions: dict[str, bool] = {}
    for r in rows:
        directions.setdefault(str(r["metric"]), higher_is_better(r))
    better = ", ".join(
        f"{m} {_arrow(h)}" for m, h in sorted(directions.items(), key=lambda kv: metric_sort_key(kv[0]))
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


def main_table(mr: ModelResults, flagged: set[str]) -> str:
    cols = headline_columns(mr)
    header = ["Cell", "bpw", *column_headers(mr, cols)]
    columns = [metric_cells(mr, mr.cells, t, m) for t, m in cols]
    body = [
        [_cell_name(c, flagged), _fmt_bpw(c), *(col[i] for col in columns)] for i, c in enumerate(mr.cells)
    ]
    return md_table(header, body)


def cells_table(mr: ModelResults) -> str:
    """What each cell is and what it cost: method options, size, fraction quantized, time."""
    header = [
        "Cell",
        "id",
        "method",
        "bits",
        "options",
        "stored as",
        "quantized fraction",
        "file size",
        "quantize s",
    ]
    body = [
        [
            c.label,
            f"`{c.id}`",
            c.method,
            MISSING if c.bits is None else str(c.bits),
            _short(c.options) if c.options else MISSING,
            format_shares(c.formats),
            MISSING if c.quantized_fraction is None else f"{c.quantized_fraction:.3f}",
            _fmt_size(c.file_size_bytes),
            MISSING if c.quantize_s is None else f"{c.quantize_s:.1f}",
        ]
        for c in mr.cells
    ]
    return md_table(header, body, align=["l", "l", "l", "r", "l", "l", "r", "r", "r"])


def format_shares(formats: dict[str, float]) -> str:
    """``Q4_0 75 %, Q2_K 25 %``: what the quantized linears are stored as, by share of weights
    (a llama.cpp "Q2_K" on rows that are not multiples of 256 is mostly Q4_0)."""
    if not formats:
        return MISSING
    return ", ".join(f"{k} {100 * v:.0f} %" for k, v in formats.items())


def frontier_lines(mr: ModelResults) -> list[str]:
    """Which cells are Pareto-optimal in bpw against each plotted metric."""
    lines = []
    for task, metric in plot_columns(mr):
        points = plotted_points(mr, task, metric)
        idx = pareto_frontier([(x, y) for _, x, y in points], _direction(mr, task, metric))
        if idx:
            names = " → ".join(f"{points[i][0].label} ({points[i][1]:.3f})" for i in idx)
            lines.append(f"- Pareto frontier, bpw vs {task} {metric}: {names}")
    return lines


def detail_table(mr: ModelResults, task: str) -> str:
    metrics = mr.metrics(task)
    header = ["Cell", "n", *(f"{m} {_arrow(_direction(mr, task, m))}" for m in metrics)]
    columns = [metric_cells(mr, mr.cells, task, m) for m in metrics]
    body = []
    for i, cell in enumerate(mr.cells):
        ns = [r.get("n") for m in metrics if (r := mr.get(cell, task, m)) and r.get("n") is not None]
        body.append([_cell_name(cell, set()), str(max(ns)) if ns else MISSING, *(col[i] for col in columns)])
    return md_table(header, body)


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``, so any text renders verbatim."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _example_block(example: Any) -> str:
    """One generation, truncated, in a fence it cannot break out of, with why it was flagged."""
    text = str(example.get("text", "")) if isinstance(example, dict) else str(example)
    reasons = example.get("reasons") if isinstance(example, dict) else None
    if len(text) > MAX_EXAMPLE_CHARS:
        text = text[:MAX_EXAMPLE_CHARS] + " […]"
    fence = _fence(text)
    return f"- reasons: {', '.join(map(str, reasons or [])) or MISSING}\n\n{fence}text\n{text}\n{fence}\n"


def collapse_examples(mr: ModelResults) -> list[str]:
    """Example generations flagged as collapsed: per cell and gen task, the first row carrying some."""
    out = []
    for cell in mr.cells:
        for task in (t for t in mr.tasks() if task_kind(t) == "gen"):
            rows = (mr.get(cell, task, m) for m in mr.metrics(task))
            row = next((r for r in rows if r and (r.get("details") or {}).get("examples")), None)
            if row is None:
                continue
            out.append(f"**{cell.label}** (`{cell.id}`, {task}):\n")
            out += [_example_block(ex) for ex in row["details"]["examples"][:MAX_EXAMPLES_PER_CELL]]
    return out


def render_markdown(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The whole ``report.md`` as text."""
    models = group_by_model(rows)
    studies = _distinct(r.get("study") for r in rows)
    title = title or f"q2lab study report: {', '.join(studies) or 'results'}"
    parts = [f"# {title}", "", how_to_read(rows), "", "## Provenance", "", *provenance_lines(rows, models)]
    parts.append("")
    if not models:
        parts += ["No results.", ""]
    if any(plot_columns(mr) for mr in models):
        parts += [f"![bpw against quality, Pareto frontier]({PLOT_NAME})", ""]
    for mr in models:
        parts += model_section(mr)
    return "\n".join(parts).rstrip() + "\n"


def model_section(mr: ModelResults) -> list[str]:
    dissociations = find_dissociations(mr)
    flagged = {d.cell.id for d in dissociations}
    parts = [f"## {mr.model}", "", main_table(mr, flagged), ""]
    parts += frontier_lines(mr)
    if dissociations:
        parts += [
            "",
            "> **Dissociation (MC vs generation).** These cells look lossless on multiple choice "
            "but their free generation collapses, so an MC-only evaluation would miss the damage:",
            ">",
            *(f"> - † {d.describe()}" for d in dissociations),
        ]
    parts += paired_section(mr)
    parts += ["", f"### {mr.model}: cells", "", cells_table(mr), ""]
    for task in mr.tasks():
        parts += [f"### {mr.model}: {task}", "", detail_table(mr, task), ""]
    examples = collapse_examples(mr)
    if examples:
        parts += [f"### {mr.model}: collapse examples", "", *examples]
    return parts


# --------------------------------------------------------------------------- paired statistics
def _rows_by_task(mr: ModelResults, cell: Cell) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (cid, task, metric), r in mr.rows.items():
        if cid == cell.id:
            out.setdefault(task, {})[metric] = r
    return out


def paired_rows(mr: ModelResults) -> list[list[str]]:
    """Table rows: every quantized cell's headline metrics against the reference, paired."""
    from q2lab.study.compare import COMPARED_METRICS, compare_rows, format_comparison

    ref = mr.reference
    if ref is None:
        return []
    body = []
    for cell in mr.quantized:
        for task in mr.tasks():
            metric = next(
                (m for m in COMPARED_METRICS.get(task_kind(task), ()) if m in mr.metrics(task)), None
            )
            row, ref_row = (mr.get(cell, task, metric), mr.get(ref, task, metric)) if metric else (None, None)
            result = compare_rows(row, ref_row) if row and ref_row else None
            if result is None:
                continue
            d = column_decimals([_num(row.get("value")), _num(ref_row.get("value"))])  # type: ignore[union-attr]
            diff, pv, verdict = format_comparison(result, d)
            body.append([cell.label, f"{task} {metric}", f"{row['value']:.{d}f}", diff, pv, verdict])  # type: ignore[index]
    return body


def average_rows(mr: ModelResults) -> list[list[str]]:
    """Table rows: each cell's average over its MC benchmarks with a stratified CI, and the
    paired difference to the reference's average over the same benchmarks."""
    from q2lab.study.compare import average_of, benchmark_rows, compare_averages, format_comparison

    ref = mr.reference
    ref_rows = benchmark_rows(_rows_by_task(mr, ref)) if ref else []
    body = []
    for cell in mr.cells:
        rows = benchmark_rows(_rows_by_task(mr, cell))
        avg = average_of(rows) if len(rows) >= 2 else None
        if avg is None:
            continue
        value, lo, hi = avg
        names = ", ".join(f"{r['task'].split(':', 1)[-1]} {r['metric']}" for r in rows)
        diff = pv = verdict = MISSING
        if ref is not None and cell is not ref:
            c = compare_averages(rows, ref_rows)
            if c is not None:
                diff, pv, verdict = format_comparison(c, 4)
        body.append([_cell_name(cell, set()), f"{value:.4f} [{lo:.4f}, {hi:.4f}]", diff, pv, verdict, names])
    return body


def paired_section(mr: ModelResults) -> list[str]:
    parts: list[str] = []
    body = paired_rows(mr)
    if body:
        parts += [
            "",
            f"### {mr.model}: paired comparison with the reference",
            "",
            "Difference cell − reference on the *same* items/windows/prompts: paired bootstrap 95% CI, "
            "two-sided bootstrap p (and McNemar's exact test for accuracies, with the discordant "
            "counts cell-only/reference-only). *within noise*: the CI contains 0 (or McNemar p ≥ 0.05).",
            "",
            md_table(["Cell", "task metric", "value", "Δ vs reference [95% CI]", "p", "verdict"], body),
        ]
    avg = average_rows(mr)
    if avg:
        parts += [
            "",
            f"### {mr.model}: multiple-choice average",
            "",
            "Unweighted mean over the benchmarks (each counts once); CI by a stratified bootstrap "
            "(items resampled within each benchmark); Δ is paired with the reference.",
            "",
            md_table(
                ["Cell", "average [95% CI]", "Δ vs reference [95% CI]", "p", "verdict", "benchmarks"],
                avg,
                align=["l", "r", "r", "r", "l", "l"],
            ),
        ]
    return parts


# --------------------------------------------------------------------------- plot
def plot_columns(mr: ModelResults) -> list[tuple[str, str]]:
    """(task, metric) pairs worth a panel: KLD mean, perplexity, MC accuracy."""
    cols = []
    for task in mr.tasks():
        wanted = PLOT_METRICS.get(task_kind(task), ())
        metric = next((m for m in wanted if m in mr.metrics(task)), None)
        if metric:
            cols.append((task, metric))
    return cols


def _value(mr: ModelResults, cell: Cell, task: str, metric: str) -> float | None:
    row = mr.get(cell, task, metric)
    return _num(row.get("value")) if row else None


def plotted_points(mr: ModelResults, task: str, metric: str) -> list[tuple[Cell, float, float]]:
    """(cell, bpw, value) of the quantized cells that have both numbers."""
    points = []
    for cell in mr.quantized:
        value = _value(mr, cell, task, metric)
        if cell.bpw is not None and value is not None:
            points.append((cell, cell.bpw, value))
    return points


def _yerr(row: dict[str, Any]) -> tuple[float, float]:
    """Asymmetric error bar from the CI (zero where the CI is missing or inverted)."""
    v, lo, hi = _num(row.get("value")), _num(row.get("ci_low")), _num(row.get("ci_high"))
    if v is None or lo is None or hi is None:
        return 0.0, 0.0
    return max(0.0, v - lo), max(0.0, hi - v)


Styles = dict[str, tuple[str, str]]  # method → (matplotlib colour, marker)
_LEGEND_IN = 0.4  # figure inches kept below the panels for the shared legend
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def method_styles(models: Sequence[ModelResults]) -> Styles:
    """One (colour, marker) per method, identical in every panel."""
    methods = sorted({c.method for mr in models for c in mr.quantized})
    return {m: (f"C{i % 10}", _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}


def _draw_panel(ax: Any, mr: ModelResults, task: str, metric: str, styles: Styles) -> None:
    """Quantized cells as points with CI bars, the frontier as a staircase, the reference as a line."""
    points = plotted_points(mr, task, metric)
    for cell, x, y in points:
        colour, marker = styles[cell.method]
        lo, hi = _yerr(mr.get(cell, task, metric) or {})
        ax.errorbar([x], [y], yerr=[[lo], [hi]], fmt=marker, color=colour, ms=6, capsize=2, zorder=3)
        if cell.bits is not None:
            ax.annotate(f"{cell.bits}b", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    hib = _direction(mr, task, metric)
    idx = pareto_frontier([(x, y) for _, x, y in points], hib)
    if len(idx) > 1:
        xs, ys = [points[i][1] for i in idx], [points[i][2] for i in idx]
        ax.plot(xs, ys, drawstyle="steps-post", color="0.45", lw=1.2, zorder=2)
    ref = mr.reference
    ref_row = mr.get(ref, task, metric) if ref else None
    all_values = [y for _, _, y in points]
    if ref_row and _num(ref_row.get("value")) is not None:
        ref_value = float(ref_row["value"])
        all_values.append(ref_value)
        ax.axhline(ref_value, ls="--", color="k", lw=1, zorder=1)
        lo, hi = _num(ref_row.get("ci_low")), _num(ref_row.get("ci_high"))
        if lo is not None and hi is not None:
            ax.axhspan(lo, hi, color="k", alpha=0.08, lw=0, zorder=0)
    if (metric == "ppl" or metric.startswith("kld")) and all_values and min(all_values) > 0:
        ax.set_yscale("log")
    if not points:
        ax.text(0.5, 0.5, "no quantized cells", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_title(f"{mr.model}: {task} {metric} {_arrow(hib)}", fontsize=9)
    ax.set_xlabel("bits per weight (quantized linears)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.25)


def render_pareto_png(models: Sequence[ModelResults]) -> bytes:
    """The Pareto figure as PNG bytes: one row per model, one panel per plotted metric.

    Uses the Agg canvas directly (no pyplot), so no display is needed and no global backend
    or figure state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    specs = list(dict.fromkeys(col for mr in models for col in plot_columns(mr)))
    nrows, ncols = max(1, len(models)), max(1, len(specs))
    height = 3.4 * nrows + _LEGEND_IN
    fig = Figure(figsize=(4.3 * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    styles = method_styles(models)
    for r, mr in enumerate(models or [None]):
        for c, (task, metric) in enumerate(specs or [("", "")]):
            ax = axes[r][c]
            if mr is None or (task, metric) not in plot_columns(mr):
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            _draw_panel(ax, mr, task, metric, styles)
    handles = [Line2D([], [], color=col, marker=mk, ls="", label=m) for m, (col, mk) in styles.items()]
    handles += [
        Line2D([], [], color="k", ls="--", lw=1, label="float reference (band: 95% CI)"),
        Line2D([], [], color="0.45", lw=1.2, label="Pareto frontier"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, _LEGEND_IN / height, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- entry point
def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``pareto.png`` and ``report.html`` (self-contained, see
    :mod:`q2lab.study.html`) into ``out_dir``; returns {"report": ..., "plot": ..., "html": ...}.

    Everything is rendered before anything is written, and both files are staged as temporary
    siblings and only renamed into place once both are complete: on any error the previous
    report (if any) is left untouched and no temporary file remains.
    """
    from q2lab.study.html import HTML_NAME, render_html

    out_dir = Path(out_dir)
    models = group_by_model(rows)
    pareto = render_pareto_png(models)
    contents = {
        "report": (out_dir / REPORT_NAME, render_markdown(rows, title).encode("utf-8")),
        "plot": (out_dir / PLOT_NAME, pareto),
        "html": (out_dir / HTML_NAME, render_html(rows, title, pareto).encode("utf-8")),
    }
    with contextlib.ExitStack() as stack:
        staged = [(stack.enter_context(atomic_path(path)), data) for path, data in contents.values()]
        for tmp, data in staged:
            tmp.write_bytes(data)
            tmp.chmod(REPORT_FILE_MODE)
    return {key: path for key, (path, _) in contents.items()}
