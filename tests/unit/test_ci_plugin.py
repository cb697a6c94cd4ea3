"""The CI rule itself: with CI set, skips fail (gpu-marked tests excepted); without it, they skip."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SOURCE = """
import pytest

def test_runtime_skip():
    pytest.skip("no oracle")

@pytest.mark.skipif(True, reason="no llama.cpp")
def test_marker_skip():
    pass

@pytest.mark.gpu
def test_gpu_skip():
    pytest.skip("no CUDA")

def test_plain():
    pass
"""


@pytest.mark.parametrize("ci", ["1", ""])
def test_skips_fail_only_in_ci(pytester, monkeypatch, ci) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(test_mod=SOURCE)
    pytester.makepyfile(test_import="import pytest\npytest.importorskip('no_such_module_q2lab')\n")
    result = pytester.runpytest_inprocess("-p", "tests.ci_plugin", "test_mod.py")
    outcomes = result.parseoutcomes()
    if ci:
        assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 2, outcomes
        assert outcomes["skipped"] == 1 and outcomes["passed"] == 1  # the gpu test may skip
    else:
        assert outcomes == {"skipped": 3, "passed": 1}
    collected = pytester.runpytest_inprocess("-p", "tests.ci_plugin", "test_import.py").parseoutcomes()
    assert collected == ({"errors": 1} if ci else {"skipped": 1}), collected
