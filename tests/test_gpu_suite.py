"""The GPU suite's first-contact pieces, on the CPU: failed records keep their traceback, the smoke test tells a
missing package from a broken one, and the suite's last line and exit status (`benchmarks.suite_summary`) for a run
without DALI, a run with everything, and a run with failures. The JUnit report read here is written by pytest itself,
from test files that import a hidden package."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from byolfast.benchmarks import smoke
from byolfast.benchmarks.common import error_fields, missing_module

ROOT = Path(__file__).resolve().parents[1]


def _load_dali():
    import nvidia.dali  # noqa: F401   (raises: the package is hidden)


def test_error_fields_keep_the_traceback_and_the_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)   # as if DALI were not installed
    try:
        try:
            _load_dali()
        except ImportError as e:
            raise RuntimeError("the dali backend cannot start") from e
    except RuntimeError as err:
        fields = error_fields(err)
    assert fields["error"] == "RuntimeError: the dali backend cannot start"
    assert "_load_dali" in fields["traceback"] and "ModuleNotFoundError" in fields["traceback"]
    assert fields["missing_module"] == "nvidia.dali"
    assert missing_module(ValueError("x")) is None and "missing_module" not in error_fields(ValueError("x"))


def test_smoke_tells_a_missing_package_from_a_broken_one(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(smoke.Missing):
        smoke.import_package("dali")

    def broken(name):   # installed, but a dependency of it is not
        raise ModuleNotFoundError("No module named 'astunparse'", name="astunparse")

    monkeypatch.setattr(smoke.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError):
        smoke.import_package("ffcv")


def test_smoke_checks_without_dali(monkeypatch, tmp_path):
    """DALI hidden: its import and batch are `missing`, with the reason and the traceback; FFCV's checks still run
    (stubbed here: importing FFCV and compiling its loader take ~30 s); the JSON holds every check."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    real_import = smoke.import_package
    monkeypatch.setattr(smoke, "import_package", lambda p: {"version": "stub"} if p == "ffcv" else real_import(p))
    monkeypatch.setattr(smoke, "write_images", lambda folder: folder)
    monkeypatch.setattr(smoke, "ffcv_batch", lambda folder, work, device: {"first_batch_s": 0.1})
    records = smoke.run_checks("cpu", tmp_path, tmp_path / "smoke.json")
    status = {r["name"]: r["status"] for r in records}
    assert status == {"versions": "ok", "dali_import": "missing", "ffcv_import": "ok", "images": "ok",
                      "dali_batch": "missing", "ffcv_batch": "ok"}
    dali = next(r for r in records if r["name"] == "dali_import")
    assert dali["missing_module"] == "nvidia.dali" and "Traceback" in dali["traceback"]
    assert json.loads((tmp_path / "smoke.json").read_text())["complete"] is True


def _junit(tmp_path: Path) -> Path:
    """A JUnit report written by pytest: two passes, a test module that cannot import DALI (a collection error), one
    that skips without it, one that skips without a GPU."""
    tests = tmp_path / "t"
    tests.mkdir()
    hide = "import sys\nsys.modules['nvidia.dali'] = None\n"
    (tests / "test_ok.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    (tests / "test_needs_dali.py").write_text(hide + "import nvidia.dali\n\ndef test_x():\n    pass\n")
    (tests / "test_skips.py").write_text(hide + textwrap.dedent("""\
        import pytest

        def test_dali():
            pytest.importorskip("nvidia.dali")

        @pytest.mark.skip(reason="needs a CUDA device")
        def test_cuda():
            pass
        """))
    xml = tmp_path / "gpu-tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                    f"--junitxml={xml}", str(tests)], cwd=tmp_path, capture_output=True, timeout=120)
    assert xml.is_file()
    return xml


def test_a_module_that_needs_a_missing_package_is_skipped_not_a_collection_error(tmp_path):
    """With the suite's plugin, `-x` goes past a test module that cannot import DALI; a module missing something else
    still stops the session."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_a_needs_dali.py").write_text("import sys\nsys.modules['nvidia.dali'] = None\nimport nvidia.dali\n\n"
                                               "def test_x():\n    pass\n")
    (tests / "test_b_ok.py").write_text("def test_one():\n    pass\n")
    command = [sys.executable, "-m", "pytest", "-x", "-rs", "-p", "no:cacheprovider",
               "-p", "byolfast.benchmarks.pytest_gpu_suite", str(tests)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 1 skipped" in run.stdout and "DALI is not installed" in run.stdout
    (tests / "test_c_broken.py").write_text("import a_dependency_that_is_not_there\n")
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "1 error" in run.stdout


def test_the_caps_sigint_still_gets_the_junit_report(tmp_path):
    """pytest started with SIGINT ignored (as in a background job of a non-interactive shell), sent SIGINT in the
    middle of a test: with the suite's plugin it stops there and still writes its report."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                           "def test_slow():\n    time.sleep(60)\n")
    xml = tmp_path / "report.xml"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "pytest", "-v", "-p", "no:cacheprovider",
         "-p", "byolfast.benchmarks.pytest_gpu_suite",
         f"--junitxml={xml}", "test_slow.py"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    seen = []
    for line in proc.stdout:   # test_fast's result line: test_slow starts right after it
        seen.append(line)
        if "test_fast PASSED" in line:
            break
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=30)[0]
    assert time.monotonic() - t0 < 20 and "KeyboardInterrupt" in out, out
    assert xml.is_file() and 'name="test_fast"' in xml.read_text()


def _results(tmp_path: Path, *, dali: bool, failures: bool = False) -> Path:
    """A results folder as gpu_suite.sh leaves it."""
    res = tmp_path / "res"
    res.mkdir()
    parts = [("smoke", "exit", 0 if dali else 1), ("gpu-tests", "exit", 1), ("e2e", "exit", 0),
             ("loader", "capped" if failures else "exit", 124 if failures else 0), ("ema", "exit", 0),
             ("model", "exit", 0), ("profile", "budget" if failures else "exit", None if failures else 0)]
    (res / "parts.jsonl").write_text("".join(
        json.dumps({"part": n, "status": s, "rc": rc, "seconds": 5, "cap": 60}) + "\n" for n, s, rc in parts))
    dali_batch = {"name": "dali_batch", "status": "ok"} if dali else {
        "name": "dali_batch", "status": "missing", "error": "not run: dali_import is missing"}
    checks = [{"name": "versions", "status": "ok"},
              {"name": "dali_import", "status": "ok"} if dali else {
                  "name": "dali_import", "status": "missing", "missing_module": "nvidia.dali",
                  "error": "Missing: nvidia.dali is not installed (No module named 'nvidia.dali')"},
              {"name": "ffcv_import", "status": "ok"}, {"name": "images", "status": "ok"}, dali_batch,
              {"name": "ffcv_batch", "status": "ok"}]
    (res / "smoke.json").write_text(json.dumps({"device": "cuda", "complete": True, "checks": checks}))
    records = [{"what": "e2e", "backend": "synthetic", "images_per_sec": 100.0},
               {"what": "e2e", "backend": "ffcv", "images_per_sec": 95.0},
               {"what": "e2e", "backend": "torch", "images_per_sec": 60.0}]
    records.append({"what": "e2e", "backend": "dali", "images_per_sec": 97.0} if dali else {
        "what": "e2e", "backend": "dali", "error": "ModuleNotFoundError: No module named 'nvidia.dali'",
        "traceback": "Traceback ...", "missing_module": "nvidia.dali"})
    if failures:
        records.append({"what": "e2e", "backend": "torch", "error": "RuntimeError: CUDA out of memory",
                        "traceback": "Traceback ..."})
    (res / "e2e.json").write_text(json.dumps({"complete": True, "records": records}))
    (res / "gpu-tests.xml").write_bytes(_junit(tmp_path).read_bytes())
    return res


def _summary(res: Path) -> tuple[list[str], int]:
    out = subprocess.run([sys.executable, "-m", "byolfast.benchmarks.suite_summary", str(res)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.stderr == ""
    return out.stdout.splitlines(), out.returncode


def test_last_line_and_exit_status_without_dali(tmp_path):
    lines, code = _summary(_results(tmp_path, dali=False))
    assert code == 1
    assert lines[-1] == ("suite: ran smoke, gpu-tests, e2e, loader, ema, model, profile; skipped for a missing "
                         "package: DALI (smoke, gpu-tests, e2e); failed: none; DALI did not run -> exit 1")
    assert "DALI: missing" in lines and "FFCV: ran on cuda" in lines
    tests = next(line for line in lines if line.startswith("  gpu-tests:"))
    assert set(tests.split(": ", 1)[1].split(", ")) == {
        "2 passed", "1 errors for a missing package", "1 skipped for a missing package", "1 skipped"}


def test_last_line_when_everything_ran(tmp_path):
    res = _results(tmp_path, dali=True)
    (res / "gpu-tests.xml").write_text('<testsuites><testsuite><testcase classname="t" name="a"/></testsuite>'
                                       '</testsuites>')
    (res / "parts.jsonl").write_text((res / "parts.jsonl").read_text().replace('"rc": 1', '"rc": 0'))
    lines, code = _summary(res)
    assert code == 0
    assert lines[-1] == ("suite: ran smoke, gpu-tests, e2e, loader, ema, model, profile; skipped for a missing "
                         "package: none; failed: none; DALI and FFCV ran -> exit 0")


def test_last_line_names_failures_caps_and_the_budget(tmp_path):
    lines, code = _summary(_results(tmp_path, dali=True, failures=True))
    assert code == 1
    last = lines[-1]
    assert "failed: e2e (torch: RuntimeError: CUDA out of memory), loader (stopped at its 60 s cap)" in last
    assert "skipped for the time budget: profile" in last and last.endswith("DALI and FFCV ran -> exit 1")


def test_a_failed_stream_run_is_named(tmp_path):
    """The opt-in `e2e-stream` part exits 0 when a backend fails (the error is in its JSON): the summary reads it."""
    res = _results(tmp_path, dali=True)
    with (res / "parts.jsonl").open("a") as f:
        f.write(json.dumps({"part": "e2e-stream", "status": "exit", "rc": 0, "seconds": 5, "cap": 100}) + "\n")
    (res / "e2e-stream.json").write_text(json.dumps({"complete": True, "records": [
        {"what": "e2e", "backend": "ffcv", "error": "RuntimeError: stream", "traceback": "Traceback ..."}]}))
    lines, code = _summary(res)
    assert code == 1 and "e2e-stream (ffcv: RuntimeError: stream)" in lines[-1]


def test_no_results_at_all(tmp_path):
    lines, code = _summary(tmp_path)
    assert code == 1 and lines[-1].startswith("suite: ran nothing;") and "DALI and FFCV did not run" in lines[-1]


def test_a_crashed_smoke_part_is_a_failure_not_a_run(tmp_path):
    res = _results(tmp_path, dali=False)
    smoke = json.loads((res / "smoke.json").read_text())
    smoke.update(complete=False, checks=smoke["checks"][:4])   # killed by a signal during the DALI batch
    (res / "smoke.json").write_text(json.dumps(smoke))
    (res / "parts.jsonl").write_text((res / "parts.jsonl").read_text().replace('"rc": 1', '"rc": 139', 1))
    lines, code = _summary(res)
    assert code == 1 and "failed: smoke (exit 139)" in lines[-1] and "ran smoke" not in lines[-1]
