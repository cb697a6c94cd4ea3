"""report.html: self-contained page with tables, Pareto plot, CI bars, the dissociation table and
side-by-side collapse examples; rendered in headless Chromium when the browser is installed."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from typing import Any

import pytest

from q2lab.study import html as rh
from q2lab.study import report
from tests.unit.test_report import _collapse_units, row

LOOP = "the the the the the the the the the the"
PROSE = "She opened the window and listened to the rain."


def _gen(
    cell: str, collapse: float, text: str, reasons: list[str], tf: float | None = None
) -> list[dict[str, Any]]:
    ex = {"prompt": "Once upon a time", "text": text, "n_new": 64, "hit_eos": False, "reasons": reasons}
    out = [
        row(
            cell,
            "gen:collapse",
            "collapse_rate",
            collapse,
            details={"examples": [ex], **_collapse_units(round(collapse * 8), 8)},  # 8 prompts
            higher_is_better=False,
        )
    ]
    if tf is not None:
        out += [
            row(cell, "gen:collapse", "tf_kld", tf, higher_is_better=False),
            row(cell, "gen:collapse", "fr_kld", tf * 8, higher_is_better=False),
        ]
    return out


@pytest.fixture()
def study_rows() -> list[dict[str, Any]]:
    """gptq-b2 keeps ppl and MC but loops (the planted dissociation); rtn-b2 is broken everywhere."""
    cells = {
        "fp": (10.0, None, 0.40, 0.0, PROSE, []),
        "gptq-b4": (10.2, 0.03, 0.40, 0.0, PROSE, []),
        "gptq-b2": (10.3, 0.05, 0.395, 0.75, LOOP, ["loop: 40-token span repeating every 1 (> 10)"]),
        "rtn-b2": (400.0, 2.5, 0.26, 1.0, "xq zz", ["gibberish: reference NLL 9.0 nats/token (> 6.0)"]),
    }
    out = []
    for cell, (ppl, kld, acc, collapse, text, reasons) in cells.items():
        out.append(row(cell, "ppl:wikitext2", "ppl", ppl))
        if kld is not None:
            out.append(row(cell, "kld:wikitext2", "kld_mean", kld))
        out.append(row(cell, "mc:hellaswag", "acc_norm", acc, ci=(acc - 0.02, acc + 0.02)))
        out += _gen(cell, collapse, text, reasons, None if cell == "fp" else (kld or 0) / 2)
    return out


def test_page_is_self_contained_with_tables_plots_and_the_dissociation(study_rows):
    page = rh.render_html(study_rows, "HTML study")
    assert page.startswith("<!DOCTYPE html>") and "<title>HTML study</title>" in page
    assert len(re.findall(r'<img id="(pareto|bars)"', page)) == 2
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: one file is the report
    assert page.count("<table>") >= 5  # main, retention, per-task details
    retention = {r.cell.label: r for r in report.retention_rows(report.group_by_model(study_rows)[0])}
    assert retention["GPTQ 2b"].flag and not retention["RTN 2b"].flag and not retention["GPTQ 4b"].flag
    assert retention["GPTQ 2b"].mc == pytest.approx(0.395 / 0.40)
    assert retention["GPTQ 2b"].ll == pytest.approx(10.0 / 10.3)
    assert retention["GPTQ 2b"].gen == pytest.approx(0.25)
    assert retention["GPTQ 2b"].fr_kld == pytest.approx(0.2)
    assert '<tr class="flag"><td>GPTQ 2b' in page and "<b>dissociation</b>" in page
    # side by side: the reference's prose next to the looping cell's text, highlighted with the reason
    block = page.split("GPTQ 2b — gen:collapse", 1)[1].split("</div></div>", 1)[0]
    assert PROSE in block and 'class="collapsed"' in block and "loop: 40-token span" in block
    assert "<script>alert" not in rh.render_html(
        [row("fp", "gen:x", "collapse_rate", 0.0, label="<script>alert")]
    )


def test_write_report_writes_the_html_next_to_the_markdown(study_rows, tmp_path):
    paths = report.write_report(study_rows, tmp_path)
    assert paths["html"].name == "report.html"
    assert paths["plot"].read_bytes() in __import__("base64").b64decode(
        paths["html"]
        .read_text()
        .split('id="pareto" alt="Pareto plot: bpw vs quality" src="data:image/png;base64,')[1]
        .split('"')[0]
    )


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_headless_chromium_shows_the_tables_and_plots(study_rows, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); report.html not rendered")
    path = report.write_report(study_rows, tmp_path)["html"]
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=3000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    tables = int(re.search(r'data-tables="(\d+)"', body.group(1)).group(1))
    images = int(re.search(r'data-images-ok="(\d+)"', body.group(1)).group(1))
    assert tables >= 5 and images == 2  # every table is in the DOM and both plots decoded
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1280,1600", f"--screenshot={shot}", path.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert _png_size(shot.read_bytes()) == (1280, 1600) and shot.stat().st_size > 20_000  # not a blank page
