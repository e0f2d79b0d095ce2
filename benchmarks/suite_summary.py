"""The end of `benchmarks/gpu_suite.sh`: what ran, what was skipped for a missing package, what failed, in one line.

    python -m byolfast.benchmarks.suite_summary RESULTS_DIR

Reads what the suite left in its results folder: `parts.jsonl` (one line per part: `part`, `rc`, `seconds`, `cap`,
`status` = `exit`, `capped` or `budget`), `smoke.json` (`benchmarks.smoke`), the benchmark JSONs (`*.json` with
`records`: a failed record keeps `error`, `traceback` and, for a package that is not installed, `missing_module`) and
`gpu-tests.xml` (pytest's JUnit report). Prints one line per part, then the last line, for example

    suite: ran smoke, gpu-tests, ema, e2e, model, loader, profile; skipped for a missing package: DALI (smoke,
    gpu-tests, e2e, loader); failed: none; DALI did not run -> exit 1

(on one line). A package counts as run when the smoke test's batch of it passed (on the suite's device). Exit status
1 when DALI or FFCV did not run or anything failed, else 0. Only the standard library: it must work whatever else is
broken.
"""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# display name -> (smoke check / backend name, the module whose absence means "not installed")
PACKAGES = {"DALI": ("dali", "nvidia.dali"), "FFCV": ("ffcv", "ffcv")}
BENCH_PARTS = ("ema", "e2e", "model", "loader", "compile", "e2e-stream")
_MISSING_TEXT = re.compile(r"No module named '([\w.]+)'|could not import '([\w.]+)'|import of ([\w.]+) halted")


def package_of_module(module: Optional[str]) -> Optional[str]:
    """`DALI` / `FFCV` when `module` is that package or a parent of it (`nvidia`), else None."""
    if not module:
        return None
    for name, (_, mod) in PACKAGES.items():
        if mod == module or mod.startswith(module + "."):
            return name
    return None


def package_of_text(text: str) -> Optional[str]:
    """The package a pytest skip or collection error names as not importable, if one of ours."""
    for m in _MISSING_TEXT.finditer(text or ""):
        found = package_of_module(next(g for g in m.groups() if g))
        if found:
            return found
    return None


@dataclass
class Summary:
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)                        # for the budget
    missing: dict[str, list[str]] = field(default_factory=dict)             # package -> where it was missing
    packages: dict[str, str] = field(default_factory=dict)                  # package -> ran / missing / failed / ...
    lines: list[str] = field(default_factory=list)                          # the report above the last line

    def miss(self, package: str, where: str) -> None:
        places = self.missing.setdefault(package, [])
        if where not in places:
            places.append(where)


def read_parts(res: Path) -> list[dict]:
    path = res / "parts.jsonl"
    if not path.is_file():
        return []
    parts = []
    for line in path.read_text().splitlines():
        try:
            parts.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return parts


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def smoke_problems(res: Path, s: Summary) -> list[str]:
    """Reads smoke.json into `s.packages` and `s.missing`; the checks that failed."""
    data = _load_json(res / "smoke.json")
    for name in PACKAGES:
        s.packages[name] = "did not run (no smoke record)"
    if data is None:
        return ["no smoke.json"]
    failed = [] if data.get("complete") else ["stopped before its last check (smoke.json incomplete)"]
    checks = {c.get("name"): c for c in data.get("checks", [])}
    for c in checks.values():
        status = c.get("status")
        s.lines.append(f"  smoke {c.get('name')}: {status} ({c.get('seconds', '?')} s)"
                       + (f": {c['error']}" if c.get("error") else ""))
        if status == "failed":
            failed.append(str(c.get("name")))
    for name, (key, _) in PACKAGES.items():
        imported = checks.get(f"{key}_import", {}).get("status")
        batch = checks.get(f"{key}_batch", {}).get("status")
        if batch == "ok":
            s.packages[name] = f"ran on {data.get('device', '?')}"
        elif "missing" in (imported, batch):
            s.packages[name] = "missing"
            s.miss(name, "smoke")
        elif batch == "failed" or imported == "failed":
            s.packages[name] = "failed"
        else:
            s.packages[name] = "did not run (the smoke test stopped before its batch)"
    return failed


def bench_problems(res: Path, part: str, s: Summary) -> list[str]:
    """Failed records of a benchmark JSON (missing packages go to `s.missing`)."""
    data = _load_json(res / f"{part}.json")
    if data is None:
        return []
    failed = []
    for r in data.get("records", []):
        if not r.get("error"):
            continue
        name = str(r.get("backend") or r.get("variant") or "?")
        package = package_of_module(r.get("missing_module"))
        if package:
            s.miss(package, part)
        else:
            failed.append(f"{name}: {str(r['error']).splitlines()[0][:80]}")
    if not data.get("complete", True):
        failed.append("incomplete JSON")
    return failed


def junit_problems(res: Path, s: Summary) -> tuple[list[str], bool]:
    """Counts of gpu-tests.xml; the problems not due to a missing package, and whether every problem was one."""
    path = res / "gpu-tests.xml"
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return ["no JUnit report"], False
    counts: Counter = Counter()
    problems = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}.{case.get('name', '')}".strip(".")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        text = f"{outcome.get('message', '')}\n{outcome.text or ''}"
        package = package_of_text(text)
        if outcome.tag == "skipped":
            counts["skipped for a missing package" if package else "skipped"] += 1
            if package:
                s.miss(package, "gpu-tests")
        elif package:
            counts["errors for a missing package"] += 1
            s.miss(package, "gpu-tests")
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            problems.append(f"{name}: {outcome.get('message', '')[:80]}")
    s.lines.append("  gpu-tests: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or "no tests"))
    return problems, not problems


def summarise(res: Path) -> Summary:
    s = Summary()
    parts = read_parts(res)
    if not parts:
        s.failed.append("the suite (no parts.jsonl)")
    for p in parts:
        name, status, rc = p.get("part", "?"), p.get("status"), p.get("rc")
        if status == "budget":
            s.lines.append(f"{name}: not run, the time budget was spent")
        else:
            s.lines.append(f"{name}: {'exit ' + str(rc) if status == 'exit' else 'stopped at its cap'} after "
                           f"{p.get('seconds', '?')} s (cap {p.get('cap', '?')} s)")
        if status == "budget":
            s.skipped.append(name)
            continue
        if name == "smoke":
            problems = smoke_problems(res, s)
            only_missing = not problems
        elif name == "gpu-tests":
            problems, only_missing = junit_problems(res, s)
        elif name in BENCH_PARTS:
            problems = bench_problems(res, name, s)
            only_missing = False
        else:
            problems, only_missing = [], False
        for problem in problems:
            s.lines.append(f"  {name}: {problem}")
        if status == "capped":
            s.failed.append(f"{name} (stopped at its {p.get('cap')} s cap)")
        elif rc != 0 and (not only_missing or rc != 1):   # 1: a package missing; a crash (139) or pytest's 5
            # (no test collected) is a failure even where every check it wrote reads "missing"
            s.failed.append(f"{name} (exit {rc})")
        elif problems:
            s.failed.append(f"{name} ({'; '.join(problems[:2])}{' ...' if len(problems) > 2 else ''})")
        else:
            s.ran.append(name)
    if not any(p.get("part") == "smoke" for p in parts):
        smoke_problems(res, s)
    return s


def last_line(s: Summary) -> tuple[str, int]:
    not_run = [name for name, state in s.packages.items() if not state.startswith("ran")]
    code = 1 if not_run or s.failed else 0
    missing = "; ".join(f"{pkg} ({', '.join(where)})" for pkg, where in s.missing.items()) or "none"
    verdict = (f"{' and '.join(not_run)} did not run" if not_run
               else f"{' and '.join(s.packages)} ran" if s.packages else "no package checked")
    line = (f"suite: ran {', '.join(s.ran) or 'nothing'}; skipped for a missing package: {missing}; "
            f"failed: {', '.join(s.failed) or 'none'}"
            + (f"; skipped for the time budget: {', '.join(s.skipped)}" if s.skipped else "")
            + f"; {verdict} -> exit {code}")
    return line, code


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m byolfast.benchmarks.suite_summary RESULTS_DIR", file=sys.stderr)
        return 2
    s = summarise(Path(args[0]))
    for line in s.lines:
        print(line)
    for name, state in s.packages.items():
        print(f"{name}: {state}")
    line, code = last_line(s)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
