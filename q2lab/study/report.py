"""Turn a study's ``results.jsonl`` into ``report.md``, ``pareto.png`` and ``report.html``.

A study writes one JSON object per line: one metric of one task for one grid cell
(:class:`q2lab.study.rows.ResultRow`).  The report only reads those rows; it never re-runs
anything, so a report can be rebuilt from the records alone and two reports of the same
records are identical.  The work is split by concern:

* :mod:`q2lab.study.rows`: the typed row, loading and validation, cells and per-model indexes;
* :mod:`q2lab.study.analysis`: Pareto frontier, MC–generation dissociation, retention, paired
  statistics (numbers, shared by every renderer);
* :mod:`q2lab.study.formatting`: numbers, cells and provenance as table text (shared by the
  markdown and HTML renderers);
* renderers: :mod:`q2lab.study.markdown` (report.md), :mod:`q2lab.study.plots` (pareto.png and
  the HTML's bar charts), :mod:`q2lab.study.html` (report.html).

This module writes the files (:func:`write_report`) and re-exports the names callers use, so
``from q2lab.study.report import load_results, write_report, render_markdown`` keeps working.

All files are rendered in memory first and then moved into place together, so a failure never
leaves a half-written report (or a new report next to a stale plot from a failed run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from q2lab.study.analysis import (
    GEN_COLLAPSED,
    HEADLINE_METRICS,
    MC_KEPT,
    PLOT_METRICS,
    BenchmarkAverage,
    Dissociation,
    Frontier,
    PairedComparison,
    Retention,
    benchmark_averages,
    best_cells,
    find_dissociations,
    frontiers,
    gen_retention,
    headline_columns,
    paired_comparisons,
    pareto_frontier,
    plot_columns,
    plotted_points,
    retention_rows,
)
from q2lab.study.formatting import (
    MAX_EXAMPLE_CHARS,
    MISSING,
    average_table_rows,
    column_decimals,
    column_headers,
    decimals_for,
    format_shares,
    format_value,
    frontier_lines,
    how_to_read,
    metric_cells,
    paired_table_rows,
    provenance_lines,
)
from q2lab.study.html import HTML_NAME, render_html
from q2lab.study.markdown import (
    MAX_EXAMPLES_PER_CELL,
    REPORT_NAME,
    cells_table,
    collapse_examples,
    detail_table,
    main_table,
    md_table,
    model_section,
    paired_section,
    render_markdown,
)
from q2lab.study.plots import PLOT_NAME, method_styles, render_bars_png, render_pareto_png
from q2lab.study.rows import (
    DEFAULT_HIGHER_IS_BETTER,
    METRIC_ORDER,
    ROW_FIELDS,
    TASK_KIND_ORDER,
    Cell,
    ModelResults,
    ResultRow,
    group_by_model,
    higher_is_better,
    load_results,
    metric_sort_key,
    parse_rows,
    task_kind,
    task_sort_key,
    validate_rows,
)
from q2lab.utils.io import atomic_path

REPORT_FILE_MODE = 0o644  # the staging file comes from mkstemp (0600); a report is meant to be read by others


def write_report(
    rows: Sequence[Mapping[str, Any] | ResultRow], out_dir: Path, title: str | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``pareto.png`` and ``report.html`` (self-contained, see
    :mod:`q2lab.study.html`) into ``out_dir``; returns {"report": ..., "plot": ..., "html": ...}.

    Everything is rendered before anything is written, and the files are staged as temporary
    siblings and only renamed into place once all are complete: on any error the previous
    report (if any) is left untouched and no temporary file remains.
    """
    out_dir = Path(out_dir)
    rows = parse_rows(rows)
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


__all__ = [
    "DEFAULT_HIGHER_IS_BETTER",
    "GEN_COLLAPSED",
    "HEADLINE_METRICS",
    "HTML_NAME",
    "MAX_EXAMPLES_PER_CELL",
    "MAX_EXAMPLE_CHARS",
    "MC_KEPT",
    "METRIC_ORDER",
    "MISSING",
    "PLOT_METRICS",
    "PLOT_NAME",
    "REPORT_FILE_MODE",
    "REPORT_NAME",
    "ROW_FIELDS",
    "TASK_KIND_ORDER",
    "BenchmarkAverage",
    "Cell",
    "Dissociation",
    "Frontier",
    "ModelResults",
    "PairedComparison",
    "ResultRow",
    "Retention",
    "average_table_rows",
    "benchmark_averages",
    "best_cells",
    "cells_table",
    "collapse_examples",
    "column_decimals",
    "column_headers",
    "decimals_for",
    "detail_table",
    "find_dissociations",
    "format_shares",
    "format_value",
    "frontier_lines",
    "frontiers",
    "gen_retention",
    "group_by_model",
    "headline_columns",
    "higher_is_better",
    "how_to_read",
    "load_results",
    "main_table",
    "md_table",
    "method_styles",
    "metric_cells",
    "metric_sort_key",
    "model_section",
    "paired_comparisons",
    "paired_section",
    "paired_table_rows",
    "pareto_frontier",
    "parse_rows",
    "plot_columns",
    "plotted_points",
    "provenance_lines",
    "render_bars_png",
    "render_html",
    "render_markdown",
    "render_pareto_png",
    "retention_rows",
    "task_kind",
    "task_sort_key",
    "validate_rows",
    "write_report",
]
