"""CI runs every oracle: with ``CI`` set, a skipped test (or a module skipped at import) fails.

llama.cpp, Chromium, lm-eval, if-verifiable and Ray are all installed by ``.ci/run``, and the long
tests run there (``Q2LAB_LONG_TESTS=1``), so a skip in CI means an oracle silently did not run.
Tests marked ``gpu`` are the one exception: CI has no GPU.  Outside CI, skips stay skips.
"""

from __future__ import annotations

import os

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _ci_failure(report, where: str) -> None:
    """In CI a skip is a failure: an oracle (llama.cpp, Chromium, a long or Gemma test) that does
    not run must not pass silently.  Only tests marked ``gpu`` may skip on CI's CPU machine."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{where} skipped in CI ({reason}); CI must run every oracle and long test"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        _in_ci()
        and report.skipped
        and item.get_closest_marker("gpu") is None
        and not hasattr(report, "wasxfail")
    ):
        _ci_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:  # a module-level importorskip / skip
        _ci_failure(report, collector.nodeid)
