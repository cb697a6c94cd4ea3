"""The study report renders exactly as it did before the issue-13 refactor (report.py split into
rows / analysis / formatting / markdown / plots / html).

``tests/unit/golden`` holds what the *pre-refactor* code rendered from every committed
``docs/results/*/results.jsonl`` and from ``synthetic_results.jsonl`` (a small study with what
the committed ones lack: a planted MC–generation dissociation, collapse examples, harness and
IFEval rows, a benchmark average, a second model without a reference): ``report_<study>.md``
byte for byte, ``report_<study>.html`` with each inlined PNG replaced by its sha256, and the
sha256 of the whole page in ``golden.json``.  Regenerate (``python tests/unit/golden/regenerate.py``)
only for an intended change of the report, and review the diff.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import matplotlib
import pytest

from q2lab.study import html as rh
from q2lab.study import report
from q2lab.study.analysis import headline_columns
from tests.docs_numbers import study_results

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
META = json.loads((GOLDEN / "golden.json").read_text(encoding="utf-8"))
STUDIES = sorted(META["studies"])
_IMG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
_SHA = re.compile(r'src="png-sha256:[0-9a-f]{64}"')


def results_path(study: str) -> Path:
    if study == "synthetic":
        return GOLDEN / "synthetic_results.jsonl"
    return ROOT / "docs" / "results" / study / "results.jsonl"


def png_hashes(page: str) -> str:
    """The page with each inlined PNG replaced by its sha256 (the golden .html form)."""

    def digest(m: re.Match) -> str:
        return f'src="png-sha256:{hashlib.sha256(base64.b64decode(m.group(1))).hexdigest()}"'

    return _IMG.sub(digest, page)


def test_every_committed_study_has_a_golden_report():
    committed = {p.parent.name for p in study_results(ROOT)}
    assert committed <= set(STUDIES), f"no golden report for {committed - set(STUDIES)}"


@pytest.mark.parametrize("study", STUDIES)
def test_markdown_is_byte_identical(study):
    text = report.render_markdown(report.load_results(results_path(study)))
    golden = (GOLDEN / f"report_{study}.md").read_text(encoding="utf-8")
    assert text == golden
    assert hashlib.sha256(text.encode()).hexdigest() == META["studies"][study]["md_sha256"]


@pytest.mark.parametrize("study", STUDIES)
def test_html_text_is_identical(study, monkeypatch):
    """The page around the figures (figures stubbed: matplotlib is slow, and its PNG bytes are
    compared below where the matplotlib version matches)."""
    monkeypatch.setattr(rh, "render_pareto_png", lambda models: b"pareto")
    monkeypatch.setattr(rh, "render_bars_png", lambda mr: b"bars" if headline_columns(mr) else None)
    page = png_hashes(rh.render_html(report.load_results(results_path(study))))
    golden = (GOLDEN / f"report_{study}.html").read_text(encoding="utf-8")
    assert _SHA.sub('src="png"', page) == _SHA.sub('src="png"', golden)


@pytest.mark.parametrize("study", ["synthetic", "finetune-2bit"])
def test_html_with_figures_is_byte_identical(study, tmp_path):
    """The whole page as write_report writes it.  The figures' bytes are compared only under
    the matplotlib version that drew the golden ones (another version may draw other bytes);
    under any other version every figure must still be present and decodable."""
    paths = report.write_report(report.load_results(results_path(study)), tmp_path)
    page = paths["html"].read_text(encoding="utf-8")
    golden = (GOLDEN / f"report_{study}.html").read_text(encoding="utf-8")
    assert paths["report"].read_text(encoding="utf-8") == (GOLDEN / f"report_{study}.md").read_text(
        encoding="utf-8"
    )
    if matplotlib.__version__ != META["matplotlib"]:
        pngs = [base64.b64decode(m) for m in _IMG.findall(page)]
        assert len(pngs) == len(_SHA.findall(golden)) and all(p[:4] == b"\x89PNG" for p in pngs)
        assert _SHA.sub('src="png"', png_hashes(page)) == _SHA.sub('src="png"', golden)
        return
    assert png_hashes(page) == golden
    assert hashlib.sha256(page.encode()).hexdigest() == META["studies"][study]["html_sha256"]
    png = paths["plot"].read_bytes()
    assert hashlib.sha256(png).hexdigest() == META["studies"][study]["pareto_png_sha256"]
