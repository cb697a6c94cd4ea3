"""``report.md``: a study's results as GitHub-flavoured markdown.

Written for a reader deciding "which method at which size?": one main table per model with the
headline metric of every task (best quantized value bold), the Pareto frontier, the
MC–generation dissociation (:func:`q2lab.study.analysis.find_dissociations`), paired statistics
against the reference, what each cell is, per-task details, collapse examples, and provenance,
so a number in the table can be traced to versions, seeds, data and Hessians.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from q2lab.study.analysis import (
    LanguageMismatch,
    find_dissociations,
    headline_columns,
    language_mismatches,
    plot_columns,
)
from q2lab.study.formatting import (
    AVERAGE_HEADER,
    LANGUAGE_NOTE,
    MAX_EXAMPLE_CHARS,
    MISSING,
    PAIRED_HEADER,
    average_table_rows,
    cell_name,
    distinct,
    fmt_size,
    format_shares,
    frontier_lines,
    gen_measure_tables,
    how_to_read,
    main_table_rows,
    metric_cells,
    metric_header,
    paired_table_rows,
    provenance_lines,
    short,
)
from q2lab.study.plots import PLOT_NAME
from q2lab.study.rows import ModelResults, ResultRow, group_by_model, parse_rows, task_kind

REPORT_NAME = "report.md"
MAX_EXAMPLES_PER_CELL = 3


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is a list of 'l'/'r' per column."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(_md_escape(c) for c in line) + " |" for line in lines)


# --------------------------------------------------------------------------- tables
def main_table(mr: ModelResults, flagged: set[str]) -> str:
    return md_table(*main_table_rows(mr, headline_columns(mr), flagged))


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
            short(c.options) if c.options else MISSING,
            format_shares(c.formats),
            MISSING if c.quantized_fraction is None else f"{c.quantized_fraction:.3f}",
            fmt_size(c.file_size_bytes),
            MISSING if c.quantize_s is None else f"{c.quantize_s:.1f}",
        ]
        for c in mr.cells
    ]
    return md_table(header, body, align=["l", "l", "l", "r", "l", "l", "r", "r", "r"])


def detail_table(mr: ModelResults, task: str) -> str:
    """Every metric of one task, per cell, with the number of units."""
    metrics = mr.metrics(task)
    header = ["Cell", "n", *(metric_header(mr, task, m) for m in metrics)]
    columns = [metric_cells(mr, mr.cells, task, m) for m in metrics]
    body = []
    for i, cell in enumerate(mr.cells):
        ns = [r.n for m in metrics if (r := mr.get(cell, task, m)) and r.n is not None]
        body.append([cell_name(cell), str(max(ns)) if ns else MISSING, *(col[i] for col in columns)])
    return md_table(header, body)


def paired_section(mr: ModelResults) -> list[str]:
    """The paired comparison with the reference and the multiple-choice average, when any."""
    parts: list[str] = []
    body = paired_table_rows(mr)
    if body:
        parts += [
            "",
            f"### {mr.model}: paired comparison with the reference",
            "",
            "Difference cell − reference on the *same* items/windows/prompts: paired bootstrap 95% CI, "
            "two-sided bootstrap p (and McNemar's exact test for accuracies, with the discordant "
            "counts cell-only/reference-only). *within noise*: the CI contains 0 (or McNemar p ≥ 0.05).",
            "",
            md_table(PAIRED_HEADER, body),
        ]
    for task, (header, rows) in gen_measure_tables(mr).items():
        parts += [
            "",
            f"### {mr.model}: {task}, continuous measures paired with the reference",
            "",
            "Per prompt, cell − reference on the same prompts, mean Δ [paired bootstrap 95% CI] "
            "(`*`: the CI excludes 0), so cells that all collapse are still ranked. rep4: share of "
            "repeated 4-grams; distinct2: share of distinct bigrams; zlib_ratio: compression ratio; "
            "longest_loop: longest repeated span (tokens); drift: share of language evidence not "
            "in the prompt's language; echo: share of word 6-grams copied from the prompt; ref_nll: "
            "the reference's NLL of the cell's text (nats/token). tf_kld / fr_kld: KL(reference ‖ "
            "cell) per token along the reference's / the cell's own generations; agree_tokens: "
            "greedy tokens shared with the reference before the first departure (mean [95% CI]).",
            "",
            md_table(header, rows),
        ]
    avg = average_table_rows(mr)
    if avg:
        parts += [
            "",
            f"### {mr.model}: multiple-choice average",
            "",
            "Unweighted mean over the benchmarks (each counts once); CI by a stratified bootstrap "
            "(items resampled within each benchmark); Δ is paired with the reference.",
            "",
            md_table(AVERAGE_HEADER, avg, align=["l", "r", "r", "r", "l", "l"]),
        ]
    return parts


# --------------------------------------------------------------------------- examples
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
            row = next((r for r in rows if r and (r.details or {}).get("examples")), None)
            if row is None:
                continue
            out.append(f"**{cell.label}** (`{cell.id}`, {task}):\n")
            out += [_example_block(ex) for ex in (row.details or {})["examples"][:MAX_EXAMPLES_PER_CELL]]
    return out


def language_lines(mismatches: Sequence[LanguageMismatch]) -> list[str]:
    if not mismatches:
        return []
    return ["", f"> {LANGUAGE_NOTE}", ">", *(f"> - {m.describe()}" for m in mismatches)]


# --------------------------------------------------------------------------- the report
def model_section(mr: ModelResults) -> list[str]:
    dissociations = find_dissociations(mr)
    flagged = {d.cell.id for d in dissociations}
    parts = [f"## {mr.model}", "", main_table(mr, flagged), ""]
    parts += frontier_lines(mr)
    if dissociations:
        parts += [
            "",
            "> **Dissociation (MC vs generation).** These cells look lossless on multiple choice "
            "but their free generation collapses — significantly more often than the reference's on "
            "the same prompts — so an MC-only evaluation would miss the damage:",
            ">",
            *(f"> - † {d.describe()}" for d in dissociations),
        ]
    parts += language_lines(language_mismatches(mr))
    parts += paired_section(mr)
    parts += ["", f"### {mr.model}: cells", "", cells_table(mr), ""]
    for task in mr.tasks():
        parts += [f"### {mr.model}: {task}", "", detail_table(mr, task), ""]
    examples = collapse_examples(mr)
    if examples:
        parts += [f"### {mr.model}: collapse examples", "", *examples]
    return parts


def render_markdown(rows: Sequence[Mapping[str, Any] | ResultRow], title: str | None = None) -> str:
    """The whole ``report.md`` as text."""
    rows = parse_rows(rows)
    models = group_by_model(rows)
    studies = distinct(r.study for r in rows)
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
