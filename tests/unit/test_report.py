"""Study report: tables, bold best, Pareto frontier, dissociation flag, PNG, atomic writes."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from q2lab.errors import DataError
from q2lab.study import report
from tests.docs_numbers import study_results

MODEL = "tiny-llama"


def row(cell: str, task: str, metric: str, value: float | None, **kw: Any) -> dict[str, Any]:
    """One results.jsonl row; ``cell`` is the short id, method/bits/bpw inferred from it."""
    method, _, rest = cell.partition("-b")
    is_ref = method == "fp"
    bits = None if is_ref else int(rest.split("-")[0])
    ci = kw.pop("ci", (None, None) if value is None else (value * 0.9, value * 1.1))
    base = {
        "study": "unit",
        "cell": f"{MODEL}/{cell}",
        "model": MODEL,
        "method": method,
        "bits": bits,
        "label": "fp16" if is_ref else f"{method.upper()} {bits}b",
        "options": {} if is_ref else {"group_size": 128},
        "bpw": 16.0 if is_ref else bits + 0.25 + (0.02 if method == "gptq" else 0.0),
        "task": task,
        "metric": metric,
        "value": value,
        "ci_low": ci[0],
        "ci_high": ci[1],
        "n": 32,
        "higher_is_better": metric in ("acc", "acc_norm", "top1_agree"),
        "details": {},
        "provenance": {"versions": {"torch": "2.13.0"}, "model_fingerprint": "fp-abc", "seed": 7},
        "timings": {"quantize_s": 1.5},
    }
    if is_ref:
        base["is_reference"] = True
    base.update(kw)
    return base


PPL = {"fp": 10.0, "gptq-b2": 30.0, "gptq-b4": 10.5, "rtn-b2": 900.0, "rtn-b4": 11.0}
KLD = {"gptq-b2": 0.8, "gptq-b4": 0.04, "rtn-b2": 3.0, "rtn-b4": 0.06}


@pytest.fixture()
def rows() -> list[dict[str, Any]]:
    out = []
    for cell, ppl in PPL.items():
        out.append(row(cell, "ppl:wikitext2", "ppl", ppl))
        if cell in KLD:
            out.append(row(cell, "kld:wikitext2", "kld_mean", KLD[cell]))
    return out


def first_table(text: str) -> list[str]:
    """Lines of the first markdown table in ``text`` (header and rule included)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def table_rows(text: str, heading: str = f"## {MODEL}\n") -> dict[str, list[str]]:
    """The table after ``heading`` as {cell name: [column texts...]}."""
    lines = first_table(text.split(heading, 1)[1])[2:]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return {c[0]: c[1:] for c in cells}


# --------------------------------------------------------------------------- tables
def test_main_table_has_one_row_per_cell_with_values_and_cis(rows):
    text = report.render_markdown(rows)
    table = table_rows(text)
    assert list(table) == ["fp16 (reference)", "GPTQ 2b", "GPTQ 4b", "RTN 2b", "RTN 4b"]
    # columns: bpw, kld_mean, ppl (KLD first: the most sensitive signal)
    # one precision per column, enough for its smallest value (0.0400)
    assert table["GPTQ 2b"] == ["2.270", "0.8000 [0.7200, 0.8800]", "30.00 [27.00, 33.00]"]
    assert table["RTN 2b"][2] == "900.00 [810.00, 990.00]"
    assert table["fp16 (reference)"][0] == "16.000"


def test_best_non_reference_value_is_bold_and_reference_never(rows):
    rows.append(row("fp", "kld:wikitext2", "kld_mean", 0.0))  # reference would otherwise win
    table = table_rows(report.render_markdown(rows))
    assert table["GPTQ 4b"][1].startswith("**0.0400**")
    assert table["GPTQ 4b"][2].startswith("**10.50**")
    assert "**" not in table["fp16 (reference)"][1] + table["fp16 (reference)"][2]
    assert sum(c.count("**") for r in table.values() for c in r) == 4  # exactly two bold cells


def test_higher_is_better_metric_bolds_the_maximum():
    values = {"fp": 0.5, "gptq-b2": 0.4, "rtn-b2": 0.3}
    rows = [row(c, "mc:hellaswag", "acc_norm", v) for c, v in values.items()]
    table = table_rows(report.render_markdown(rows))
    assert table["GPTQ 2b"][1].startswith("**0.400**")
    assert "**" not in table["RTN 2b"][1]


def test_missing_metric_renders_as_dash(rows):
    rows = [r for r in rows if r["cell"] != f"{MODEL}/rtn-b4" or r["task"] != "kld:wikitext2"]
    rows.append(row("gptq-b2", "mc:hellaswag", "acc", 0.41))
    rows.append(row("rtn-b2", "mc:hellaswag", "acc", None))  # a null value counts as missing too
    table = table_rows(report.render_markdown(rows))
    assert table["RTN 4b"][1] == report.MISSING
    assert table["RTN 2b"][3] == report.MISSING  # acc shown because there is no acc_norm
    assert table["fp16 (reference)"][1] == report.MISSING


def test_value_without_ci_is_shown_alone():
    rows = [row("gptq-b2", "gen:collapse", "rep4", 0.25, ci=(None, None))]
    assert "| **0.250** |" in report.render_markdown(rows)


def test_detail_tables_list_every_metric_of_a_task(rows):
    rows.append(row("gptq-b2", "kld:wikitext2", "kld_p99", 7.5))
    rows.append(row("gptq-b2", "kld:wikitext2", "top1_agree", 0.8))
    detail = first_table(report.render_markdown(rows).split(f"### {MODEL}: kld:wikitext2\n", 1)[1])
    assert detail[0] == "| Cell | n | kld_mean ↓ | kld_p99 ↓ | top1_agree ↑ |"
    gptq2 = "| GPTQ 2b | 32 | 0.8000 [0.7200, 0.8800] | **7.500** [6.750, 8.250] | **0.800** [0.720, 0.880] |"
    assert gptq2 in detail


def test_last_duplicate_row_wins(rows):
    rows.append(row("gptq-b2", "ppl:wikitext2", "ppl", 29.0))
    assert table_rows(report.render_markdown(rows))["GPTQ 2b"][2].startswith("29.00")


def test_provenance_summary_flags_disagreement(rows):
    rows[-1]["provenance"] = {**rows[-1]["provenance"], "versions": {"torch": "2.12.0"}}
    text = report.render_markdown(rows)
    assert "fingerprint `fp-abc`" in text
    assert "torch `2.13.0`, `2.12.0` (**differs across cells**)" in text


# --------------------------------------------------------------------------- dissociation
def _collapse_units(collapsed: int, prompts: int) -> dict[str, Any]:
    """Per-prompt collapse units (the first ``collapsed`` prompts collapsed), as records carry them."""
    from q2lab.eval.stats import UNITS_KEY, UnitScores

    sums = [1.0] * collapsed + [0.0] * (prompts - collapsed)
    return {UNITS_KEY: UnitScores(sums, ids_sha256="prompts").to_json()}


def _dissociation_rows(
    acc: float,
    ref_ci: tuple[float, float] = (0.38, 0.42),
    ref_collapse: int = 0,
    collapsed: int = 12,
    prompts: int = 40,
) -> list[dict[str, Any]]:
    example = {"examples": [{"text": "a a a a ``` a", "reasons": ["rep4"]}]}
    return [
        row("fp", "mc:hellaswag", "acc_norm", 0.40, ci=ref_ci),
        row(
            "fp",
            "gen:collapse",
            "collapse_rate",
            ref_collapse / prompts,
            ci=(0.0, 0.05),
            details=_collapse_units(ref_collapse, prompts),
        ),
        row("gptq-b2", "mc:hellaswag", "acc_norm", acc),
        row(
            "gptq-b2",
            "gen:collapse",
            "collapse_rate",
            collapsed / prompts,
            details={**example, **_collapse_units(collapsed, prompts)},
        ),
        row("gptq-b4", "mc:hellaswag", "acc_norm", 0.40),
        row("gptq-b4", "gen:collapse", "collapse_rate", 0.0, details=_collapse_units(0, prompts)),
    ]


def test_dissociation_is_flagged_when_mc_matches_reference_but_generation_collapses():
    text = report.render_markdown(_dissociation_rows(acc=0.39))
    assert "**Dissociation (MC vs generation).**" in text
    assert "GPTQ 2b** (`tiny-llama/gptq-b2`): collapse_rate 0.300 (reference: 0.000) on" in text
    assert "McNemar p = 0.000488 (12 prompts collapse only here, 0 only in the reference)" in text
    assert "GPTQ 2b †" in text and "GPTQ 4b †" not in text
    # the collapsed generation is shown verbatim inside a fence longer than its backtick run
    assert "````text\na a a a ``` a\n````" in text


def test_no_dissociation_when_mc_accuracy_also_drops():
    text = report.render_markdown(_dissociation_rows(acc=0.30))
    assert "Dissociation (MC vs generation)" not in text
    assert "†" not in text.split("## Provenance", 1)[1]


def test_no_dissociation_when_the_reference_collapses_as_often():
    text = report.render_markdown(_dissociation_rows(acc=0.39, ref_collapse=12))
    assert "Dissociation (MC vs generation)" not in text


@pytest.mark.parametrize("collapsed,flagged", [(4, False), (8, True)])
def test_a_dissociation_needs_a_significant_generation_loss(collapsed, flagged):
    """0 vs 4 collapsed of 8 prompts is McNemar p = 0.125: not evidence; 0 vs 8 (p = 0.0078) is."""
    text = report.render_markdown(_dissociation_rows(acc=0.39, collapsed=collapsed, prompts=8))
    assert ("Dissociation (MC vs generation)" in text) is flagged


def test_no_dissociation_without_per_prompt_units():
    rows = _dissociation_rows(acc=0.39)
    for r in rows:
        r["details"].pop("units", None)
    assert "Dissociation (MC vs generation)" not in report.render_markdown(rows)


def test_no_dissociation_from_a_wide_small_sample_interval_alone():
    # 0.30 lies inside the reference's wide CI, but it keeps only 75% of the reference's accuracy
    text = report.render_markdown(_dissociation_rows(acc=0.30, ref_ci=(0.20, 0.60)))
    assert "Dissociation (MC vs generation)" not in text


# --------------------------------------------------------------------------- pareto
def test_pareto_frontier_lower_is_better():
    points = [
        (2.0, 5.0),  # 0: fewest bits → on the frontier
        (2.5, 6.0),  # 1: more bits and worse → dominated by 0
        (3.0, 1.0),  # 2: on
        (3.0, 2.0),  # 3: same bits as 2, worse → dominated
        (4.0, 1.0),  # 4: same value as 2 with more bits → dominated
        (4.5, 0.5),  # 5: on
        (5.0, math.nan),  # 6: not a number → ignored
    ]
    assert report.pareto_frontier(points) == [0, 2, 5]


def test_pareto_frontier_higher_is_better_and_duplicates():
    points = [(4.0, 0.9), (2.0, 0.6), (3.0, 0.55), (2.0, 0.6), (3.0, 0.8)]
    assert report.pareto_frontier(points, higher_is_better=True) == [1, 4, 0]
    assert report.pareto_frontier([]) == []


def test_report_lists_the_frontier(rows):
    rows.append(row("gptq-b3", "ppl:wikitext2", "ppl", 10.8))  # fewer bits and better than RTN 4b (11.0)
    frontier = "RTN 2b (2.250) → GPTQ 2b (2.270) → GPTQ 3b (3.270) → GPTQ 4b (4.270)"
    assert f"- Pareto frontier, bpw vs ppl:wikitext2 ppl: {frontier}" in report.render_markdown(rows)


# --------------------------------------------------------------------------- files
def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_writes_markdown_and_a_valid_png(rows, tmp_path):
    rows.append(row("gptq-b2", "mc:hellaswag", "acc_norm", 0.4))
    paths = report.write_report(rows, tmp_path / "study", title="Unit study")
    assert set(paths) == {"report", "plot", "html"}
    text = paths["report"].read_text(encoding="utf-8")
    assert text.startswith("# Unit study\n")
    assert "![bpw against quality, Pareto frontier](pareto.png)" in text
    width, height = png_size(paths["plot"].read_bytes())
    assert 800 <= width <= 3000 and 300 <= height <= 2000  # three panels in one row
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == [
        "pareto.png",
        "report.html",
        "report.md",
    ]


def test_one_row_of_panels_per_model(rows, tmp_path):
    other = [{**r, "model": "other", "cell": r["cell"].replace(MODEL, "other")} for r in rows]
    one = png_size(report.write_report(rows, tmp_path / "a")["plot"].read_bytes())
    two = png_size(report.write_report(rows + other, tmp_path / "b")["plot"].read_bytes())
    assert two[0] == one[0] and two[1] > 1.7 * one[1]


def test_failed_write_leaves_previous_files_and_no_temporaries(rows, tmp_path, monkeypatch):
    out = tmp_path / "study"
    out.mkdir()
    (out / "report.md").write_text("old report")
    real_write = Path.write_bytes

    def failing_write(self: Path, data: bytes) -> int:
        if "pareto" in self.name:
            raise OSError("disk full")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(rows, out)
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert (out / "report.md").read_text() == "old report"


def test_failed_rendering_writes_nothing(rows, tmp_path, monkeypatch):
    def boom(models):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(report, "render_pareto_png", boom)
    with pytest.raises(RuntimeError):
        report.write_report(rows, tmp_path / "study")
    assert not (tmp_path / "study").exists() or not any((tmp_path / "study").iterdir())


# --------------------------------------------------------------------------- loading
def test_load_results_skips_blank_lines(rows, tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n  \n" + json.dumps(rows[2]) + "\n")
    assert report.load_results(path) == rows[:3]


def test_load_results_names_the_bad_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"cell": "a"}\n\n{"cell": \n')
    with pytest.raises(DataError, match=r"results\.jsonl:3: invalid JSON"):
        report.load_results(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        report.load_results(path)
    with pytest.raises(DataError, match="does not exist"):
        report.load_results(tmp_path / "missing.jsonl")


def test_rows_without_a_task_are_rejected_with_their_number(rows):
    del rows[1]["task"]
    with pytest.raises(DataError, match="result row 2 lacks task"):
        report.render_markdown(rows)


def test_empty_results_still_render(tmp_path):
    paths = report.write_report([], tmp_path)
    assert "No results." in paths["report"].read_text(encoding="utf-8")
    png_size(paths["plot"].read_bytes())


# --------------------------------------------------------------------------- paired statistics
def _units(bits: str) -> dict[str, Any]:
    return {"units": {"n": len(bits), "bits": bits, "transform": "identity", "ids_sha256": "items"}}


def test_paired_section_and_benchmark_average():
    ref_bits = "1" * 60 + "0" * 40
    near = "0" + "1" * 59 + "1" + "0" * 39  # one lost, one gained: within noise
    bad = "0" * 20 + "1" * 40 + "0" * 40  # 20 lost: worse
    rows = []
    for cell, bits in (("fp", ref_bits), ("gptq-b4", near), ("rtn-b2", bad)):
        for task in ("mc:arc_easy", "mc:hellaswag"):
            v = bits.count("1") / len(bits)
            rows.append(row(cell, task, "acc_norm", v, details=_units(bits), higher_is_better=True))
    text = report.render_markdown(rows)
    paired = text.split("paired comparison with the reference", 1)[1].split("###", 1)[0]
    lines = {
        ln.split(" | ")[0].strip("| ") + ln.split(" | ")[1]: ln for ln in paired.splitlines() if "|" in ln
    }
    assert "within noise" in lines["GPTQ 4bmc:arc_easy acc_norm"]
    assert "worse" in lines["RTN 2bmc:arc_easy acc_norm"] and "McNemar" in lines["RTN 2bmc:arc_easy acc_norm"]
    avg = text.split("multiple-choice average", 1)[1].split("###", 1)[0]
    assert "0.6000 [" in avg and "(reference)" in avg
    rtn = next(ln for ln in avg.splitlines() if ln.startswith("| RTN 2b"))
    assert "worse" in rtn and "-0.2000" in rtn


def test_no_paired_section_without_units(rows):
    assert "paired comparison" not in report.render_markdown(rows)


def test_cells_table_shows_what_the_linears_are_stored_as(rows):
    """A llama.cpp "Q2_K" on rows that are not multiples of 256 is mostly Q4_0: the cells table
    says so from the record's quant.formats; older records without it show a dash."""
    mixed = [
        r | {"quant": {"formats": {"Q4_0": 0.75, "Q2_K": 0.25}}} if r["cell"].endswith("rtn-b2") else r
        for r in rows
    ]
    (mr,) = report.group_by_model(mixed)
    lines = {line.split(" | ")[0].strip("| "): line for line in report.cells_table(mr).splitlines()}
    assert "| Q4_0 75 %, Q2_K 25 % |" in lines["RTN 2b"]
    assert f"| {report.MISSING} |" in lines["GPTQ 2b"]
    assert report.format_shares({}) == report.MISSING


# --------------------------------------------------------------------------- typed rows
def test_rows_of_committed_studies_round_trip_through_the_typed_record():
    """Every committed results.jsonl line parses into a ResultRow and back to the same object;
    the runner writes every field of the eval Record and of the row (file_size_bytes: when set;
    calibration: in studies with several named calibrations)."""
    import dataclasses

    from q2lab.eval.records import Record
    from q2lab.study.rows import ROW_FIELDS, ResultRow

    assert {f.name for f in dataclasses.fields(Record)} <= set(ROW_FIELDS)
    paths = study_results(Path(__file__).resolve().parents[2])
    assert paths
    for path in paths:
        for d in report.load_results(path):
            assert ResultRow.from_dict(d).to_dict() == d
            assert set(d) - {"calibration"} == set(ROW_FIELDS) - {"file_size_bytes", "calibration"}


def test_typed_rows_keep_unknown_fields_and_render_like_dicts(rows):
    from q2lab.study.rows import ResultRow, parse_rows

    typed = parse_rows([r | {"future_field": 1} for r in rows])
    assert typed[0].extra == {"future_field": 1} and typed[0].to_dict()["future_field"] == 1
    assert (
        typed[0].number("value") == 10.0
        and ResultRow("c", "t", "m", value=float("nan")).number("value") is None
    )
    assert report.render_markdown(typed) == report.render_markdown(rows)
    with pytest.raises(DataError, match="result row 2 lacks metric"):
        parse_rows([rows[0], {"cell": "x", "task": "ppl:w"}])


def _float_units(values: list[float]) -> dict[str, Any]:
    from q2lab.eval.stats import UNITS_KEY, UnitScores

    return {UNITS_KEY: UnitScores(values, ids_sha256="prompts").to_json()}


def test_continuous_generation_measures_are_paired_with_the_reference():
    """Two cells that both collapse on every prompt are still ranked: their rep4 differs from
    the reference's with a CI that excludes 0, and the table says so next to McNemar's p."""
    n = 30
    rows = []
    for cell, collapsed, rep in (("fp", 0, 0.05), ("gptq-b2", n, 0.6), ("rtn-b2", n, 0.3)):
        rows.append(
            row(cell, "gen:chat_suite", "collapse_rate", collapsed / n, details=_collapse_units(collapsed, n))
        )
        reps = [rep + 0.01 * (i % 3) for i in range(n)]
        rows.append(row(cell, "gen:chat_suite", "rep4", float(np.mean(reps)), details=_float_units(reps)))
        if cell != "fp":
            rows.append(row(cell, "gen:chat_suite", "tf_kld", 1.5, ci=(1.2, 1.8)))
    text = report.render_markdown(rows)
    section = text.split("gen:chat_suite, continuous measures paired with the reference", 1)[1].split(
        "###", 1
    )[0]
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in section.splitlines() if ln.startswith("| ")}
    assert "1.000 (p 1.9e-09; 30/0)" in lines["GPTQ 2b"]
    assert "+0.550 [+0.550, +0.550]*" in lines["GPTQ 2b"] and "+0.250 [" in lines["RTN 2b"]
    assert "1.500 [1.200, 1.800]" in lines["GPTQ 2b"]
    assert "continuous measures" not in report.render_markdown([r for r in rows if r["metric"] != "rep4"])
