"""The rows of a study's ``results.jsonl``: one typed record per line, and the index the report uses.

A row is one metric of one task for one grid cell: the :class:`q2lab.eval.records.Record`
fields plus the cell's model, method, bits, label, bpw, task settings and provenance.  The
runner builds every row as a :class:`ResultRow` and the report parses every line into one, so
the field names are defined here once.

Fields hold the JSON values as written, ``None`` where a line lacks the key (old results
files lack fields added later); nothing is coerced, so a report of old rows reads them as
it always did.  Use :func:`num` (or :meth:`ResultRow.number`) for a value that must be a finite
number.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q2lab.errors import DataError

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
#: Fields every row must have (non-empty) to be placed in a table.
REQUIRED_FIELDS = ("cell", "task", "metric")


@dataclass(frozen=True)
class ResultRow:
    """One line of ``results.jsonl``."""

    # what was measured (the eval Record)
    cell: str  # grid cell id, "<model>/<method>-b<bits>-…"
    task: str  # "ppl:wikitext2", "mc:hellaswag", …
    metric: str  # "ppl", "acc_norm", …
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None  # resampling units (windows, items, prompts)
    higher_is_better: bool | None = None
    details: dict[str, Any] | None = None  # data hash, context, per-unit scores, examples, …
    # the cell
    study: str | None = None
    model: str | None = None
    method: str | None = None
    bits: int | None = None
    label: str | None = None
    options: dict[str, Any] | None = None
    is_reference: bool | None = None
    # the named calibration of a study with several (absent with one)
    calibration: str | None = field(default=None, metadata={"omit_none": True})
    bpw: float | None = None
    quantized_fraction: float | None = None
    # the task's settings, the quantization report, provenance, timings
    task_key: str | None = None  # resume key of (cell, task settings)
    task_settings: dict[str, Any] | None = None
    # proxy_rel_mean, notes, params, formats (+ bpw_no_codebooks; + finetune: the tuning stages'
    # held-out losses per block and end to end, and PV-tuning's rounds)
    quant: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None  # quantize_s, eval_s
    file_size_bytes: int | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "result row") -> ResultRow:
        """A row from a JSON object; fails naming ``where`` when it lacks a required field."""
        if not isinstance(d, Mapping):
            raise DataError(f"{where} is not a JSON object")
        missing = [k for k in REQUIRED_FIELDS if not d.get(k)]
        if missing:
            raise DataError(f"{where} lacks {', '.join(missing)}: {json.dumps(d)[:200]}")
        known = {k: d[k] for k in ROW_FIELDS if k in d}
        for k in REQUIRED_FIELDS:
            known[k] = str(known[k])
        return cls(**known, extra={k: v for k, v in d.items() if k not in _FIELD_SET})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this row (the line the runner appends)."""
        out = {}
        for f in _FIELDS:
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = v
        out.update(self.extra)
        return out

    # ------------------------------------------------------------------ derived
    def number(self, key: str) -> float | None:
        """Field ``key`` (``value``, ``ci_low``, ``ci_high``) as a finite float, else None."""
        return num(getattr(self, key))

    @property
    def model_name(self) -> str:
        """The model: the ``model`` field, else the cell id's prefix, else ``"model"``."""
        if self.model:
            return str(self.model)
        return self.cell.split("/", 1)[0] if "/" in self.cell else "model"

    @property
    def of_reference(self) -> bool:
        """Whether the row belongs to the float reference cell."""
        return bool(self.is_reference) or self.method == "fp"

    @property
    def prov(self) -> dict[str, Any]:
        """``provenance`` as a dict ({} when absent or malformed)."""
        return self.provenance if isinstance(self.provenance, dict) else {}


_FIELDS = [f for f in dataclasses.fields(ResultRow) if f.name != "extra"]
#: Field names of a row, in the order the runner writes them.
ROW_FIELDS = tuple(f.name for f in _FIELDS)
_FIELD_SET = frozenset(ROW_FIELDS)


def num(x: Any) -> float | None:
    """A finite float, or None for null/NaN/inf/non-numbers (rendered as missing)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------- loading
def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl`` as JSON objects; blank lines are skipped, bad lines name their
    number.  :func:`parse_rows` turns them into :class:`ResultRow`."""
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


def parse_rows(rows: Iterable[Mapping[str, Any] | ResultRow]) -> list[ResultRow]:
    """Typed rows (already typed ones pass through); fails with the row number when a row lacks
    what it needs to be placed in a table."""
    return [
        r if isinstance(r, ResultRow) else ResultRow.from_dict(r, where=f"result row {i}")
        for i, r in enumerate(rows, start=1)
    ]


def validate_rows(rows: Sequence[Mapping[str, Any] | ResultRow]) -> None:
    """Fail with the row number when a row lacks what it needs to be placed in a table."""
    parse_rows(rows)


# --------------------------------------------------------------------------- ordering
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


def higher_is_better(row: ResultRow) -> bool:
    """The row's direction, else the metric's default direction (lower is better if unknown)."""
    hib = row.higher_is_better
    if isinstance(hib, bool):
        return hib
    return DEFAULT_HIGHER_IS_BETTER.get(str(row.metric), False)


# --------------------------------------------------------------------------- cells and models
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

    @classmethod
    def from_rows(cls, cell_id: str, rows: Sequence[ResultRow]) -> Cell:
        """The cell's attributes: per field, the first row that has it (optional fields may be
        on some rows only)."""
        method = str(_first(rows, "method") or "?")
        bpw = _first(rows, "bpw")
        size = _first(rows, "file_size_bytes")
        qfrac = _first(rows, "quantized_fraction")
        timings = _first(rows, "timings")
        quantize_s = timings.get("quantize_s") if isinstance(timings, dict) else None
        quant = _first(rows, "quant")
        formats = quant.get("formats") if isinstance(quant, dict) else None
        return cls(
            id=cell_id,
            model=rows[0].model_name,
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


def _first(rows: Iterable[ResultRow], key: str) -> Any:
    """First non-null value of field ``key`` among rows."""
    return next((v for r in rows if (v := getattr(r, key)) is not None), None)


@dataclass
class ModelResults:
    """All rows of one model, indexed by (cell id, task, metric)."""

    model: str
    cells: list[Cell]
    rows: dict[tuple[str, str, str], ResultRow]

    def get(self, cell: Cell | None, task: str, metric: str) -> ResultRow | None:
        """The row of (cell, task, metric), None when absent (or when ``cell`` is None)."""
        return None if cell is None else self.rows.get((cell.id, task, metric))

    def value(self, cell: Cell | None, task: str, metric: str) -> float | None:
        """The row's value as a finite float, None when absent or not a finite number."""
        row = self.get(cell, task, metric)
        return row.number("value") if row else None

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

    def rows_by_task(self, cell: Cell) -> dict[str, dict[str, ResultRow]]:
        """The cell's rows as {task: {metric: row}}."""
        out: dict[str, dict[str, ResultRow]] = {}
        for (cid, task, metric), r in self.rows.items():
            if cid == cell.id:
                out.setdefault(task, {})[metric] = r
        return out

    def direction(self, task: str, metric: str) -> bool:
        """Whether higher is better for (task, metric), from its first row."""
        row = next((r for (_, t, m), r in self.rows.items() if t == task and m == metric), None)
        return higher_is_better(row) if row else DEFAULT_HIGHER_IS_BETTER.get(metric, False)


def group_by_model(rows: Sequence[Mapping[str, Any] | ResultRow]) -> list[ModelResults]:
    """Models in first-seen order; a repeated (cell, task, metric) keeps the last row (a re-run)."""
    typed = parse_rows(rows)
    by_model: dict[str, list[ResultRow]] = {}
    for row in typed:
        by_model.setdefault(row.model_name, []).append(row)
    out = []
    for model, model_rows in by_model.items():
        by_cell: dict[str, list[ResultRow]] = {}
        for row in model_rows:
            by_cell.setdefault(row.cell, []).append(row)
        cells = sorted((Cell.from_rows(cid, crows) for cid, crows in by_cell.items()), key=Cell.sort_key)
        index = {(r.cell, r.task, r.metric): r for r in model_rows}
        out.append(ModelResults(model, cells, index))
    return out
