"""One import name: a user's own `train.py`, `model.py`, ... in the working folder cannot stand in for byolfast's."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pipeline", "model", "train", "benchmarks")


@pytest.fixture()
def crowded(tmp_path: Path) -> Path:
    """A working folder holding a module named like each of our packages; importing one leaves a marker file."""
    for name in PARTS:
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / ('imported-' + name))!r}, 'w').close()\n")
    return tmp_path


@pytest.mark.parametrize("launch", [["-m", "byolfast.train", "--help"], ["-m", "byolfast", "train", "--help"]])
def test_a_launch_from_a_crowded_folder_runs_byolfast(crowded: Path, launch: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    probe = ("import runpy, sys; sys.argv = [sys.argv[0], *sys.argv[1:]]; "
             "mod = sys.argv.pop(1)\n"
             "try:\n    runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
             "except SystemExit as e:\n    code = e.code\n"
             f"print('SHADOWED' if any(m in sys.modules for m in {PARTS!r}) else 'CLEAN')")
    out = subprocess.run([sys.executable, "-c", probe, *launch[1:]], cwd=crowded, env=env, capture_output=True,
                         text=True, timeout=300)
    assert "usage: byol train" in out.stdout, out.stderr[-2000:]
    assert out.stdout.strip().endswith("CLEAN"), out.stdout[-500:]
    assert not list(crowded.glob("imported-*")), "a module from the working folder was imported"
    # and the plain launch torchrun uses (the working folder first on sys.path) runs ours, not the user's files
    out = subprocess.run([sys.executable, *launch], cwd=crowded, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage: byol train" in out.stdout, out.stderr[-2000:]
    assert not list(crowded.glob("imported-*"))


def _imports(package: str) -> set[str]:
    """The byolfast parts that `package`'s modules import (absolute imports, any depth)."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                parts = name.split(".")
                if parts[0] in PARTS:
                    pytest.fail(f"{path.relative_to(ROOT)} imports {name!r}: write byolfast.{name}")
                if parts[0] == "byolfast" and len(parts) > 1:
                    found.add(parts[1])
    return found - {package}


def test_layers_pipeline_and_model_stand_alone_train_composes_them() -> None:
    assert _imports("pipeline") == set()
    assert _imports("model") == set()
    assert _imports("train") <= {"pipeline", "model"}
    assert _imports("benchmarks") <= {"pipeline", "model", "train"}


def _module_imports(folder: Path) -> dict[str, set[str]]:
    """Per file under `folder`: the absolute module names it imports (`from a.b import c` counts as `a.b.c` too, so a
    sub-module imported by name is seen), lazy imports inside functions included."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def _backend_packages() -> list[str]:
    return sorted(p.name for p in (ROOT / "pipeline" / "backends").iterdir() if (p / "__init__.py").is_file())


def _imports_backend(names: set[str], backend: str) -> bool:
    prefix = f"byolfast.pipeline.backends.{backend}"
    return any(n == prefix or n.startswith(prefix + ".") for n in names)


def test_backends_import_neither_each_other_nor_the_conversion() -> None:
    backends = _backend_packages()
    assert {"dali", "ffcv", "torch", "synthetic"} <= set(backends)
    for name in backends:
        for path, names in _module_imports(ROOT / "pipeline" / "backends" / name).items():
            for other in backends:
                assert other == name or not _imports_backend(names, other), \
                    f"{path} imports the {other} backend: share code through a module below both"
            assert not any(n.split(".")[:3] == ["byolfast", "pipeline", "convert"] for n in names), \
                f"{path} imports pipeline.convert: what a backend and the conversion share goes below both"


def test_the_conversion_reaches_the_formats_only_through_the_registry() -> None:
    assert (ROOT / "pipeline" / "convert" / "__init__.py").is_file()
    for path, names in _module_imports(ROOT / "pipeline" / "convert").items():
        used = [b for b in _backend_packages() if _imports_backend(names, b)]
        assert not used, f"{path} imports the {used} backend(s): it writes each format through its `Writer`"
