"""The GPU suite's pytest plugin (`python -m pytest -p byolfast.benchmarks.pytest_gpu_suite -x -m gpu tests/...`):

- a test module that cannot be imported because DALI or FFCV is not installed is reported as skipped, with the import
  error as the reason, instead of as a collection error. Under `-x` a collection error ends the session before any
  test runs: a machine without DALI would then run none of FFCV's GPU tests either. Any other collection error (a
  syntax error, a broken install: a missing dependency of the package rather than the package) stays an error. The
  reason names the module, so `benchmarks.suite_summary` counts it as skipped for a missing package.
- SIGINT ends the session as Ctrl-C does, with its summary and JUnit report, even where the suite was started with
  SIGINT ignored (a background job of a non-interactive shell inherits it ignored, and bash cannot restore it): the
  suite's time cap sends SIGINT first.
"""
from __future__ import annotations

import signal

import pytest

from byolfast.benchmarks.suite_summary import package_of_text


def pytest_configure(config) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
