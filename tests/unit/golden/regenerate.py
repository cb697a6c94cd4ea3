"""Rewrite the golden reports of ``tests/unit/test_report_golden.py`` with the current code.

Only for an intended change of the report's output; review ``git diff tests/unit/golden``.
Run from the repository root: ``python tests/unit/golden/regenerate.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

from q2lab.study import report  # noqa: E402
from tests.docs_numbers import study_results  # noqa: E402
from tests.unit.test_report_golden import GOLDEN, png_hashes, results_path  # noqa: E402


def main() -> None:
    studies = [p.parent.name for p in study_results(ROOT)]
    meta: dict = {"matplotlib": matplotlib.__version__, "studies": {}}
    for study in [*studies, "synthetic"]:
        rows = report.load_results(results_path(study))
        md = report.render_markdown(rows)
        png = report.render_pareto_png(report.group_by_model(rows))
        page = report.render_html(rows, None, png)
        (GOLDEN / f"report_{study}.md").write_text(md, encoding="utf-8")
        (GOLDEN / f"report_{study}.html").write_text(png_hashes(page), encoding="utf-8")
        meta["studies"][study] = {
            "md_sha256": hashlib.sha256(md.encode()).hexdigest(),
            "html_sha256": hashlib.sha256(page.encode()).hexdigest(),
            "pareto_png_sha256": hashlib.sha256(png).hexdigest(),
        }
        print(study, len(rows), "rows")
    (GOLDEN / "golden.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
