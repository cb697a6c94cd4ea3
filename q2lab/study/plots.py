"""The report's figures as PNG bytes: the Pareto figure (``pareto.png``, also inlined in
report.html) and the per-task bars with 95 % CIs of report.html.

Both use the Agg canvas directly (no pyplot), so no display is needed and no global backend or
figure state is touched.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from q2lab.study.analysis import headline_columns, pareto_frontier, plot_columns, plotted_points
from q2lab.study.formatting import arrow
from q2lab.study.rows import ModelResults, ResultRow

PLOT_NAME = "pareto.png"

Styles = dict[str, tuple[str, str]]  # method → (matplotlib colour, marker)
_LEGEND_IN = 0.4  # figure inches kept below the panels for the shared legend
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def error_bar(row: ResultRow | None) -> tuple[float, float]:
    """Asymmetric error bar from the CI (zero where the row, its CI or value is missing, or
    the CI is inverted)."""
    if row is None:
        return 0.0, 0.0
    v, lo, hi = row.number("value"), row.number("ci_low"), row.number("ci_high")
    if v is None or lo is None or hi is None:
        return 0.0, 0.0
    return max(0.0, v - lo), max(0.0, hi - v)


def method_styles(models: Sequence[ModelResults]) -> Styles:
    """One (colour, marker) per method, identical in every panel."""
    methods = sorted({c.method for mr in models for c in mr.quantized})
    return {m: (f"C{i % 10}", _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}


def _draw_panel(ax: Any, mr: ModelResults, task: str, metric: str, styles: Styles) -> None:
    """Quantized cells as points with CI bars, the frontier as a staircase, the reference as a line."""
    points = plotted_points(mr, task, metric)
    for cell, x, y in points:
        colour, marker = styles[cell.method]
        lo, hi = error_bar(mr.get(cell, task, metric))
        ax.errorbar([x], [y], yerr=[[lo], [hi]], fmt=marker, color=colour, ms=6, capsize=2, zorder=3)
        if cell.bits is not None:
            ax.annotate(f"{cell.bits}b", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    hib = mr.direction(task, metric)
    idx = pareto_frontier([(x, y) for _, x, y in points], hib)
    if len(idx) > 1:
        xs, ys = [points[i][1] for i in idx], [points[i][2] for i in idx]
        ax.plot(xs, ys, drawstyle="steps-post", color="0.45", lw=1.2, zorder=2)
    ref_row = mr.get(mr.reference, task, metric)
    all_values = [y for _, _, y in points]
    ref_value = ref_row.number("value") if ref_row else None
    if ref_row and ref_value is not None:
        all_values.append(ref_value)
        ax.axhline(ref_value, ls="--", color="k", lw=1, zorder=1)
        lo, hi = ref_row.number("ci_low"), ref_row.number("ci_high")
        if lo is not None and hi is not None:
            ax.axhspan(lo, hi, color="k", alpha=0.08, lw=0, zorder=0)
    if (metric == "ppl" or metric.startswith("kld")) and all_values and min(all_values) > 0:
        ax.set_yscale("log")
    if not points:
        ax.text(0.5, 0.5, "no quantized cells", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_title(f"{mr.model}: {task} {metric} {arrow(hib)}", fontsize=9)
    ax.set_xlabel("bits per weight (quantized linears)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.25)


def render_pareto_png(models: Sequence[ModelResults]) -> bytes:
    """The Pareto figure as PNG bytes: one row per model, one panel per plotted metric."""
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


def render_bars_png(mr: ModelResults) -> bytes | None:
    """One panel per headline (task, metric): a bar per cell with its 95 % CI (None without any)."""
    cols = headline_columns(mr)
    if not cols:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(cols))
    nrows = -(-len(cols) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 0.35 * len(mr.cells) * nrows + 1.3 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    labels = [c.label for c in mr.cells]
    for k, (task, metric) in enumerate(cols):
        ax = axes[k // ncols][k % ncols]
        rows = [mr.get(c, task, metric) for c in mr.cells]
        values = [r.number("value") if r else None for r in rows]
        errs = [error_bar(r) for r in rows]
        ys = range(len(labels))
        colours = ["0.35" if c.is_reference else "C0" for c in mr.cells]
        ax.barh(
            ys,
            [v or 0.0 for v in values],
            xerr=[[e[0] for e in errs], [e[1] for e in errs]],
            color=colours,
            capsize=2,
        )
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{task} {metric} {arrow(mr.direction(task, metric))}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    for k in range(len(cols), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
