#!/usr/bin/env bash
# Python packages for an offline GPU machine, in parts small enough for a size-capped file transfer.
#
#   bash benchmarks/pack_wheels.sh                 # DALI for Python 3.12, parts of at most 56 MiB
#   PACK_PYTHON=3.11 PACK_PART_MIB=100 bash benchmarks/pack_wheels.sh
#
# On a machine with network: downloads the wheels named in benchmarks/gpu_wheels.txt for that Python (x86-64 Linux),
# installs them into one site-packages tree (as `pip install --target` would there), compresses it with xz and
# splits it into .whl/pack-1 ... .whl/pack-N, each folder one part plus the manifest (the archive's sha256 and the
# number of parts). DALI 2.4 comes to ~160 MB this way, against 260 MB of wheels.
# Bring the folders to the GPU machine, in any order and in as many transfers as needed; `benchmarks/gpu_suite.sh`
# (through benchmarks/unpack_wheels.sh) joins and checks them and unpacks the tree into /tmp/site, or says which
# parts are missing. PACK_DEST writes the folders elsewhere than .whl/; PACK_SITE=DIR packs an installed
# site-packages folder instead of downloading (PACK_PACKAGES: what its MANIFEST says it holds).
#
# Other packs sit beside DALI's under another name: PACK_NAME=ffcv-pack writes .whl/ffcv-pack-1 ... (and removes
# only that name's earlier parts), PACK_REQUIRE is the file (a glob in the tree) the pack must hold, PACK_WHAT names
# it in the error. benchmarks/build_ffcv_kit.sh packs FFCV that way. Each MANIFEST also says the newest glibc and
# libstdc++ symbol versions that the tree's ELF files ask for (`glibc 2.34`, `glibcxx 3.4.30`): unpack_wheels.sh
# refuses a machine with an older glibc and warns about an older libstdc++.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
TARGET_PY=${PACK_PYTHON:-3.12}
PART_MIB=${PACK_PART_MIB:-56}
DEST=${PACK_DEST:-.whl}
NAME=${PACK_NAME:-pack}
LIST=benchmarks/gpu_wheels.txt
WORK=$(mktemp -d /tmp/byol-pack.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ -n "${PACK_SITE:-}" ]; then   # pack an installed site-packages folder as it is (no download)
    read -r -a PKGS <<< "${PACK_PACKAGES:-folder:$PACK_SITE}"   # what the MANIFEST says the folder holds
    cp -a "$PACK_SITE" "$WORK/site"
else
    mapfile -t PKGS < <(grep -v -E '^\s*(#|$)' "$LIST")
    PLATFORMS=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        PLATFORMS+=(--platform "$p")
    done
    echo "downloading ${#PKGS[@]} packages for Python $TARGET_PY: ${PKGS[*]}"
    "$PY" -m pip install --quiet --no-deps --no-compile --only-binary=:all: --python-version "$TARGET_PY" \
        --implementation cp "${PLATFORMS[@]}" --target "$WORK/site" "${PKGS[@]}"
fi

# Leave out what the target never loads: extension modules built for other Python versions (DALI and nvImageCodec
# ship one per version, ~90 MB), C headers, nvCOMP's command-line tools and byte code.
TAG="cpython-${TARGET_PY/./}"
find "$WORK/site" -name '*.cpython-3*.so' ! -name "*.${TAG}-*" -delete
find "$WORK/site" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$WORK"/site/nvidia/*/include "$WORK/site/nvidia/libnvcomp/bin"
REQUIRE=${PACK_REQUIRE:-nvidia/dali/backend_impl.${TAG}-*.so}
if ! compgen -G "$WORK/site/$REQUIRE" > /dev/null; then
    echo "no ${PACK_WHAT:-DALI backend} for Python $TARGET_PY among the packages ($REQUIRE)" >&2
    exit 1
fi
# The newest glibc symbol version any ELF file of the tree asks for (none: 0): the oldest glibc that loads it all.
command -v readelf > /dev/null || echo "readelf (binutils) is missing: the MANIFEST states no glibc requirement" >&2
GLIBC=$(find "$WORK/site" -type f \( -name '*.so' -o -name '*.so.*' \) -exec readelf -V --wide {} + 2>/dev/null \
        | grep -oE 'Name: GLIBC_[0-9]+(\.[0-9]+)+' | sed 's/Name: GLIBC_//' | sort -V | tail -n 1 || true)
GLIBC=${GLIBC:-0}
GLIBCXX=$(find "$WORK/site" -type f \( -name '*.so' -o -name '*.so.*' \) -exec readelf -V --wide {} + 2>/dev/null \
          | grep -oE 'Name: GLIBCXX_[0-9]+(\.[0-9]+)+' | sed 's/Name: GLIBCXX_//' | sort -V | tail -n 1 || true)
GLIBCXX=${GLIBCXX:-0}

echo "compressing $(du -sh "$WORK/site" | cut -f1) (xz, a few minutes on 2 cores)"
tar -C "$WORK/site" -cf - . | xz -T0 -6 > "$WORK/site.tar.xz"
SUM=$(sha256sum "$WORK/site.tar.xz" | cut -d' ' -f1)
(cd "$WORK" && split -b "${PART_MIB}M" -d -a 2 site.tar.xz part-)
mapfile -t PARTS < <(ls "$WORK"/part-*)

rm -rf "$DEST/$NAME"-*
mkdir -p "$DEST"
for i in "${!PARTS[@]}"; do
    dir="$DEST/$NAME-$((i + 1))"
    mkdir -p "$dir"
    mv "${PARTS[$i]}" "$dir/site.tar.xz.part-$((i + 1))"
    printf 'python %s\nsha256 %s\nparts %d\npackages %s\nglibc %s\nglibcxx %s\n' "$TARGET_PY" "$SUM" \
        "${#PARTS[@]}" "${PKGS[*]}" "$GLIBC" "$GLIBCXX" > "$dir/MANIFEST"
done
echo "wrote ${#PARTS[@]} part(s) of at most ${PART_MIB} MiB ($(du -sh "$WORK/site.tar.xz" | cut -f1) in all):"
du -sh "$DEST/$NAME"-*
