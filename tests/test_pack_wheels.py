"""Packages packed in parts for an offline GPU machine (`benchmarks/pack_wheels.sh`, `benchmarks/unpack_wheels.sh`):
the parts rebuild the tree exactly, what the target Python never loads is dropped, and a missing, damaged or foreign
part is named and unpacks nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("xz") is None, reason="needs xz")


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _site(root: Path) -> Path:
    """A small site-packages tree shaped like DALI's: one extension module per Python version, headers, data that
    does not compress (so that it needs several 1 MiB parts)."""
    dali = root / "nvidia" / "dali"
    (dali / "include").mkdir(parents=True)
    for tag in ("311", "312", "313t"):
        (dali / f"backend_impl.cpython-{tag}-x86_64-linux-gnu.so").write_bytes(tag.encode() * 100)
    (dali / "include" / "dali.h").write_text("// header\n")
    (dali / "libdali_operators.so").write_bytes(os.urandom(2_500_000))
    (root / "makefun").mkdir()
    (root / "makefun" / "__init__.py").write_text("VERSION = 1\n")
    return root


def _pack(tmp_path: Path, name: str, site: Path) -> Path:
    dest = tmp_path / name
    r = _run("pack_wheels.sh", env={"PACK_SITE": str(site), "PACK_DEST": str(dest), "PACK_PART_MIB": "1",
                                    "PACK_PYTHON": "3.12"})
    assert r.returncode == 0, r.stderr
    return dest


def test_parts_rebuild_the_tree_for_the_target_python(tmp_path):
    site = _site(tmp_path / "site")
    dest = _pack(tmp_path, "packs", site)
    packs = sorted(p.name for p in dest.iterdir())
    assert packs == ["pack-1", "pack-2", "pack-3"]   # 2.5 MB of random bytes in 1 MiB parts
    assert all((dest / p / "MANIFEST").read_text().splitlines()[2] == "parts 3" for p in packs)

    # one part missing: named, nothing unpacked
    aside = tmp_path / "aside"
    shutil.move(dest / "pack-2", aside)
    out = tmp_path / "out"
    r = _run("unpack_wheels.sh", str(dest), str(out))
    assert r.returncode == 2 and "part(s) 2 of 3 missing" in r.stderr and not out.exists()

    # a damaged part: the checksum says so, nothing unpacked
    shutil.copytree(aside, dest / "pack-2")
    part = dest / "pack-2" / "site.tar.xz.part-2"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    r = _run("unpack_wheels.sh", str(dest), str(out))
    assert r.returncode == 2 and "damaged" in r.stderr and not out.exists()

    shutil.rmtree(dest / "pack-2")
    shutil.copytree(aside, dest / "pack-2")
    r = _run("unpack_wheels.sh", str(dest), str(out))
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    dali = out / "nvidia" / "dali"
    assert sorted(p.name for p in dali.glob("backend_impl*")) == ["backend_impl.cpython-312-x86_64-linux-gnu.so"]
    assert not (dali / "include").exists()
    for rel in ("nvidia/dali/libdali_operators.so", "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so",
                "makefun/__init__.py"):
        assert (out / rel).read_bytes() == (site / rel).read_bytes()
    # a second call finds the same archive already unpacked
    assert _run("unpack_wheels.sh", str(dest), str(out)).returncode == 0


def test_parts_of_two_packings_are_refused(tmp_path):
    site = _site(tmp_path / "site")
    first = _pack(tmp_path, "first", site)
    (site / "makefun" / "__init__.py").write_text("VERSION = 2\n")
    second = _pack(tmp_path, "second", site)
    shutil.rmtree(first / "pack-3")
    shutil.copytree(second / "pack-3", first / "pack-3")
    r = _run("unpack_wheels.sh", str(first), str(tmp_path / "out"))
    assert r.returncode == 2 and "another packing" in r.stderr


def test_no_parts_and_no_backend_for_the_target_python(tmp_path):
    r = _run("unpack_wheels.sh", str(tmp_path / "none"), str(tmp_path / "out"))
    assert r.returncode == 1 and "no packed packages" in r.stderr
    site = _site(tmp_path / "site")
    (site / "nvidia" / "dali" / "backend_impl.cpython-312-x86_64-linux-gnu.so").unlink()
    dest = tmp_path / "packs"
    r = _run("pack_wheels.sh", env={"PACK_SITE": str(site), "PACK_DEST": str(dest), "PACK_PYTHON": "3.12"})
    assert r.returncode == 1 and "no DALI backend for Python 3.12" in r.stderr and not dest.exists()


def _ffcv_site(root: Path) -> Path:
    """A small tree shaped like the FFCV kit: the extension for 3.12 (a real ELF file, so that the MANIFEST states a
    glibc), its vendored libraries, a pure-Python requirement."""
    ffcv = root / "ffcv"
    ffcv.mkdir(parents=True)
    elf = Path(shutil.which("xz")).resolve()   # any dynamically linked ELF file of this system
    shutil.copyfile(elf, ffcv / "_libffcv.cpython-312-x86_64-linux-gnu.so")
    (ffcv / "__init__.py").write_text("from .loader import Loader\n")
    (root / "ffcv.libs").mkdir()
    (root / "ffcv.libs" / "libopencv_core-5be06549.so.4.6.0").write_bytes(os.urandom(300_000))
    (root / "terminaltables").mkdir()
    (root / "terminaltables" / "__init__.py").write_text("VERSION = 1\n")
    return root


def _manifest(dest: Path, name: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (dest / f"{name}-1" / "MANIFEST").read_text().splitlines())


def test_a_named_pack_sits_beside_dali_and_unpacks_on_its_own(tmp_path):
    dest = _pack(tmp_path, "packs", _site(tmp_path / "dali-site"))
    site = _ffcv_site(tmp_path / "ffcv-site")
    env = {"PACK_SITE": str(site), "PACK_DEST": str(dest), "PACK_PYTHON": "3.12", "PACK_NAME": "ffcv-pack",
           "PACK_REQUIRE": "ffcv/_libffcv.cpython-312-*.so", "PACK_WHAT": "FFCV extension",
           "PACK_PACKAGES": "ffcv==1.0.2 terminaltables==3.1.10"}
    r = _run("pack_wheels.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["ffcv-pack-1", "pack-1", "pack-2", "pack-3"]
    manifest = _manifest(dest, "ffcv-pack")
    assert manifest["parts"] == "1" and manifest["packages"] == "ffcv==1.0.2 terminaltables==3.1.10"
    if shutil.which("readelf"):   # the copied ELF file asks for some glibc symbol version
        assert manifest["glibc"].startswith("2.")
    # DALI's pack holds no ELF file here: no requirement
    assert _manifest(dest, "pack")["glibc"] == "0"

    out = tmp_path / "site-ffcv"
    r = _run("unpack_wheels.sh", str(dest), str(out), "ffcv-pack")
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ffcv", "ffcv.libs",
                                                                                     "terminaltables"]
    for rel in ("ffcv/_libffcv.cpython-312-x86_64-linux-gnu.so", "ffcv.libs/libopencv_core-5be06549.so.4.6.0"):
        assert (out / rel).read_bytes() == (site / rel).read_bytes()

    # packing FFCV again leaves DALI's parts alone; DALI's unpack never picks up FFCV's parts
    assert _run("pack_wheels.sh", env=env).returncode == 0
    assert (dest / "pack-3").is_dir()
    r = _run("unpack_wheels.sh", str(dest), str(tmp_path / "site-dali"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "site-dali" / "ffcv").exists()
    assert _run("unpack_wheels.sh", str(tmp_path / "none"), str(out), "ffcv-pack").stderr.strip() \
        == f"no packed packages under {tmp_path / 'none'}/ffcv-pack-*"

    # the file the pack must hold is missing: named, nothing written
    (site / "ffcv" / "_libffcv.cpython-312-x86_64-linux-gnu.so").unlink()
    r = _run("pack_wheels.sh", env={**env, "PACK_DEST": str(tmp_path / "other")})
    assert r.returncode == 1 and "no FFCV extension for Python 3.12" in r.stderr
    assert not (tmp_path / "other").exists()


def test_a_machine_with_an_older_glibc_unpacks_nothing(tmp_path):
    dest = _pack(tmp_path, "packs", _site(tmp_path / "site"))
    for manifest in dest.glob("pack-*/MANIFEST"):   # as if the tree needed a glibc from the future
        manifest.write_text(manifest.read_text().replace("glibc 0\n", "glibc 99.1\n"))
    out = tmp_path / "out"
    r = _run("unpack_wheels.sh", str(dest), str(out))
    assert r.returncode == 3 and not out.exists(), r.stderr
    assert "need glibc 99.1 or newer, this machine has glibc 2." in r.stderr


def test_an_older_libstdcxx_is_a_warning(tmp_path):
    if subprocess.run("ldconfig -p | grep -q 'libstdc++.so.6 .*x86-64'", shell=True).returncode != 0:
        pytest.skip("no x86-64 libstdc++ in the linker cache")
    dest = _pack(tmp_path, "packs", _site(tmp_path / "site"))
    for manifest in dest.glob("pack-*/MANIFEST"):
        manifest.write_text(manifest.read_text().replace("glibcxx 0\n", "glibcxx 3.4.999\n"))
    out = tmp_path / "out"
    r = _run("unpack_wheels.sh", str(dest), str(out))
    assert r.returncode == 0 and (out / "makefun" / "__init__.py").exists(), r.stderr
    assert "warning: they ask for libstdc++ GLIBCXX_3.4.999" in r.stderr
