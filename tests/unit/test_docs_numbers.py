"""Every number in the README's and docs/'s tables comes from a committed record
(``tests/docs_numbers.py`` says how a table names its records and how numbers are matched), and
every committed study report is exactly what its committed records render to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.docs_numbers import ROOT, check_file, documents, generated_by, generated_documents, study_results

RESULTS = study_results(ROOT)


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_number_has_a_record(doc: Path) -> None:
    problems = check_file(doc)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("results", RESULTS, ids=lambda p: p.parent.name)
def test_committed_report_is_what_its_records_render(results: Path) -> None:
    from q2lab.study.report import load_results, render_markdown

    committed = results.with_name("report.md")
    regenerate = f"q2lab report {results} --out {results.parent}"
    assert committed.exists(), f"{results} has no report.md: run {regenerate}"
    text = committed.read_text(encoding="utf-8")
    title = text.splitlines()[0].removeprefix("# ")
    assert render_markdown(load_results(results), title) == text, (
        f"{committed} differs from its records: regenerate with {regenerate}"
    )


@pytest.mark.parametrize("doc", generated_documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_documents_are_what_their_command_prints(doc: Path) -> None:
    """E.g. paired.md: ``python docs/results/…/paired.py RESULTS …`` from the committed records."""
    import shlex
    import subprocess
    import sys

    cmd = shlex.split(generated_by(doc))
    assert cmd[0] == "python" and cmd[1].startswith("docs/results/"), cmd
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == doc.read_text(encoding="utf-8"), f"{doc} differs from what `{' '.join(cmd)}` prints"


def _write(tmp: Path, body: str, records: list[dict]) -> Path:
    (tmp / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    doc = tmp / "README.md"
    doc.write_text(body)
    return doc


def test_the_checker_fails_unbacked_and_unmarked_numbers(tmp_path: Path) -> None:
    records = [
        {"metric": "ppl", "value": 80.4981, "ci_low": 72.2, "ci_high": 89.71, "bpw": 2.0036},
        {"metric": "collapse_rate", "value": 0.625, "n": 8, "details": {"share": 0.7512, "big": 5.81e6}},
    ]
    body = """# t

<!-- records: r.jsonl -->
| cell | bpw | ppl | collapsed | share | huge |
|---|---:|---:|---:|---:|---:|
| QTIP 2b g128 L = 8 | **2.004** | 80.5 [72.2, 89.7] | 5/8 | 75 % | 5.8 × 10⁶ |
| made up | 2.004 | 80.6 [72.2, 89.7] | 3 / 8 | 74 % | 6.1 × 10⁶ |

## next section: the marker no longer applies

| cell | ppl |
|---|---:|
| x | 12.5 |

<!-- numbers: definitions -->
| method | bits |
|---|---|
| rtn | 1–8 |

<!-- records: missing.jsonl -->
"""
    problems = [str(p) for p in check_file(_write(tmp_path, body, records), root=tmp_path)]
    row2 = [p for p in problems if "README.md:7:" in p]
    assert len(row2) == 4 and any("'80.6'" in p for p in row2) and any("3 / 8" in p for p in row2)
    assert any("'74 %'" in p for p in row2) and any("6.1 × 10⁶" in p for p in row2)
    assert not [p for p in problems if "README.md:6:" in p]  # the backed row: every form matched
    assert any("README.md:11:" in p and "no <!-- records" in p for p in problems)
    assert any("missing.jsonl does not exist" in p for p in problems)
    assert len(problems) == 6
