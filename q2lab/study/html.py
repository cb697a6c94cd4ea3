"""``report.html``: the study report as one self-contained page (inline CSS and PNGs, no links).

It shows what ``report.md`` shows — the main table with CIs, the paired comparison, details —
plus what reads better in a browser:

* the Pareto figure and per-task bar charts with 95 % CI whiskers (PNG, base64-inlined);
* the *dissociation table* (part of the issue's point): per quantized cell, how much of the
  reference's log-likelihood quality (``ref ppl / ppl``), multiple-choice quality (accuracy
  ratio, averaged over MC tasks) and generation quality (``(1 − collapse) / (1 − ref
  collapse)``) it keeps, its teacher-forced and free-running KLD, and a flag when MC/LL
  retention stays high while generation collapses;
* collapse examples side by side with the reference's generation of the same prompt, flagged
  ones highlighted with the reasons.

The page sets ``data-tables`` and ``data-images-ok`` on ``<body>`` once loaded, so a headless
browser test can check that the tables exist and every image decoded.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from q2lab.study.analysis import (
    GEN_ALPHA,
    GEN_COLLAPSED,
    MC_KEPT,
    find_dissociations,
    headline_columns,
    language_mismatches,
    plot_columns,
    retention_rows,
)
from q2lab.study.formatting import (
    LANGUAGE_NOTE,
    MAX_EXAMPLE_CHARS,
    PAIRED_HEADER,
    fmt,
    fmt_bpw,
    frontier_lines,
    how_to_read,
    main_table_rows,
    metric_cells,
    metric_header,
    paired_table_rows,
    provenance_lines,
)
from q2lab.study.plots import render_bars_png, render_pareto_png
from q2lab.study.rows import ModelResults, ResultRow, group_by_model, parse_rows, task_kind

HTML_NAME = "report.html"

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 12px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f1f3f5}td:first-child,th:first-child{text-align:left}
tr.flag td{background:#fff0f0}td.bad{color:#b00020;font-weight:600}
img{max-width:100%;border:1px solid #eee}
.ex{display:grid;grid-template-columns:1fr 1fr;gap:10px;margin:6px 0 14px}
.ex pre{white-space:pre-wrap;margin:0;padding:6px;background:#f7f7f7;border-left:4px solid #9ab;
  font-size:12px}
.ex .collapsed pre{background:#fff0f0;border-left-color:#d33}
.reasons{color:#b00020;font-size:12px}.muted{color:#777}
"""
_ONLOAD = (
    "<script>window.addEventListener('load',function(){var b=document.body;"
    "b.dataset.tables=document.querySelectorAll('table').length;"
    "b.dataset.imagesOk=Array.prototype.filter.call(document.images,function(i){"
    "return i.complete&&i.naturalWidth>0}).length;});</script>"
)


# --------------------------------------------------------------------------- small helpers
def _inline(text: str) -> str:
    """The markdown the tables use (``**bold**``, ``*italic*``, ```code```) as HTML, the rest escaped."""
    out = html.escape(str(text))
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w*])\*([^*\n]+?)\*(?![\w*])", r"<i>\1</i>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table(
    header: Sequence[str], body: Sequence[Sequence[str]], flagged: Sequence[bool] | None = None
) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in header)
    rows = []
    for i, row in enumerate(body):
        cls = ' class="flag"' if flagged and flagged[i] else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _img(png: bytes, alt: str, ident: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{ident}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------- retention
def retention_table(mr: ModelResults) -> str:
    """The dissociation table: what each quantized cell keeps of the reference, flagged rows red."""
    rows = retention_rows(mr)
    if not rows:
        return ""
    header = [
        "Cell",
        "bpw",
        "LL kept (ref ppl / ppl)",
        "MC kept (acc ratio)",
        "generation kept",
        "tf_kld",
        "fr_kld",
        "",
    ]
    body = [
        [
            r.cell.label,
            fmt_bpw(r.cell),
            fmt(r.ll),
            fmt(r.mc),
            fmt(r.gen),
            fmt(r.tf_kld, 4),
            fmt(r.fr_kld, 4),
            "**dissociation**" if r.flag else "",
        ]
        for r in rows
    ]
    return _table(header, body, [r.flag for r in rows])


# --------------------------------------------------------------------------- examples
def _examples(row: ResultRow | None) -> list[dict[str, Any]]:
    ex = ((row.details if row else None) or {}).get("examples") or []
    return [e for e in ex if isinstance(e, dict)]


def examples_section(mr: ModelResults) -> str:
    """Each quantized cell's example generations next to the reference's for the same prompt."""
    parts = []
    ref = mr.reference
    for task in (t for t in mr.tasks() if task_kind(t) == "gen"):
        ref_ex = {e.get("prompt"): e for e in _examples(mr.get(ref, task, "collapse_rate"))}
        for cell in mr.quantized:
            cand = _examples(mr.get(cell, task, "collapse_rate"))
            if not cand:
                continue
            parts.append(f"<h3>{html.escape(cell.label)} — {html.escape(task)}</h3>")
            for e in cand:
                parts.append(
                    f'<p class="muted">prompt: …{html.escape(str(e.get("prompt", "")))}</p><div class="ex">'
                    + _example_box("reference", ref_ex.get(e.get("prompt")))
                    + _example_box(cell.label, e)
                    + "</div>"
                )
    return "".join(parts)


def _example_box(who: str, e: dict[str, Any] | None) -> str:
    if e is None:
        return f'<div><b>{html.escape(who)}</b><pre class="muted">(no example)</pre></div>'
    reasons = e.get("reasons") or []
    text = str(e.get("text", ""))[:MAX_EXAMPLE_CHARS]
    cls = ' class="collapsed"' if reasons else ""
    why = f'<div class="reasons">{html.escape("; ".join(map(str, reasons)))}</div>' if reasons else ""
    return f"<div{cls}><b>{html.escape(who)}</b>{why}<pre>{html.escape(text)}</pre></div>"


# --------------------------------------------------------------------------- page
def render_html(
    rows: Sequence[Mapping[str, Any] | ResultRow], title: str | None = None, pareto_png: bytes | None = None
) -> str:
    """The whole page as text (``pareto_png`` reuses a figure already rendered for report.md)."""
    rows = parse_rows(rows)
    models = group_by_model(rows)
    title = title or "q2lab study report"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{_inline(how_to_read(rows))}</p>"]
    parts += ["<h2>Provenance</h2><ul>"]
    parts += [f"<li>{_inline(line.removeprefix('- '))}</li>" for line in provenance_lines(rows, models)]
    parts.append("</ul>")
    if any(plot_columns(mr) for mr in models):
        png = pareto_png if pareto_png is not None else render_pareto_png(models)
        parts += [
            "<h2>Bits per weight against quality</h2>",
            _img(png, "Pareto plot: bpw vs quality", "pareto"),
        ]
    for mr in models:
        parts += _model_html(mr)
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n{_ONLOAD}</body></html>\n"
    )


def _model_html(mr: ModelResults) -> list[str]:
    dissociations = find_dissociations(mr)
    flagged = {d.cell.id for d in dissociations}
    header, body = main_table_rows(mr, headline_columns(mr), flagged)
    out = [f"<h2>{html.escape(mr.model)}</h2>", '<div id="results">']
    out.append(_table(header, body, [c.id in flagged for c in mr.cells]))
    out.append("</div>")
    out += [f"<p>{_inline(line.removeprefix('- '))}</p>" for line in frontier_lines(mr)]
    bars = render_bars_png(mr)
    if bars:
        out += [
            "<h3>Every headline score with its 95% CI</h3>",
            _img(bars, f"{mr.model}: scores with CIs", "bars"),
        ]
    retention = retention_table(mr)
    if retention:
        out += [
            "<h3>Dissociation: what each cell keeps of the reference</h3>",
            "<p>Retention 1.0 = as good as the float reference. <i>dissociation</i>: log-likelihood and "
            f"multiple-choice retention ≥ {MC_KEPT} while generation retention &lt; {GEN_COLLAPSED} and the "
            f"collapse rate is significantly worse than the reference's on the same prompts (McNemar p &lt; "
            f"{GEN_ALPHA}) — the "
            "model scores well when handed text but collapses when it writes. tf_kld: KLD teacher-forced "
            "along the reference's generations; fr_kld: along the cell's own free-running generations.</p>",
            retention,
        ]
    for d in dissociations:
        out.append(f'<p class="reasons">† {_inline(d.describe())}</p>')
    mismatches = language_mismatches(mr)
    if mismatches:
        out.append(f"<p>{_inline(LANGUAGE_NOTE)}</p>")
        out += [f'<p class="reasons">{_inline(m.describe())}</p>' for m in mismatches]
    paired = paired_table_rows(mr)
    if paired:
        out += [
            "<h3>Paired comparison with the reference (same items)</h3>",
            _table(PAIRED_HEADER, paired),
        ]
    for task in mr.tasks():
        metrics = mr.metrics(task)
        header = ["Cell", *(metric_header(mr, task, m) for m in metrics)]
        cols_t = [metric_cells(mr, mr.cells, task, m) for m in metrics]
        rows_t = [[c.label, *(col[i] for col in cols_t)] for i, c in enumerate(mr.cells)]
        out += [f"<h3>{html.escape(task)}</h3>", _table(header, rows_t)]
    examples = examples_section(mr)
    if examples:
        out += ["<h2>Generations: reference and cell side by side</h2>", examples]
    return out
