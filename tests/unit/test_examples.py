"""Every study in examples/ parses and expands to cells (a typo in a YAML nobody has run yet —
e.g. examples/qwen-1.5b.yaml, waiting for a long CPU session — fails here, not hours in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from q2lab.study.config import load_study

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_study_parses(path: Path) -> None:
    study = load_study(path)
    assert study.name and study.cells and study.tasks


def test_qwen_15b_study_is_the_issue_19_grid() -> None:
    study = load_study(EXAMPLES[0].with_name("qwen-1.5b.yaml"))
    assert study.models == ["qwen2.5-coder-1.5b"]
    methods = sorted({c.method for c in study.cells})
    assert methods == ["fp", "gptq", "iq2_xxs", "llamacpp", "qtip", "quip#"], methods
