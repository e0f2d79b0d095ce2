"""A pytest plugin for the GPU suite: a test module that cannot be imported because DALI or FFCV is not installed is
reported as skipped, with the import error as the reason, instead of as a collection error.

    python -m pytest -p benchmarks.pytest_missing_packages -x -m gpu tests/...

With `-x`, a collection error ends the session before any test runs: a machine without DALI would then run none of
FFCV's GPU tests either. Any other collection error (a syntax error, a broken install: a missing dependency of the
package rather than the package) stays an error. The skip reason names the module, so `benchmarks.suite_summary`
counts it as skipped for a missing package.
"""
from __future__ import annotations

import pytest

from benchmarks.suite_summary import package_of_text


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module):
        text = str(report.longrepr)
        package = package_of_text(text)
        if package:
            error = next((line.strip() for line in reversed(text.splitlines()) if "Error" in line), text[-200:])
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: {package} is not installed: {error}")
