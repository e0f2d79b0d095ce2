#!/usr/bin/env bash
# Join, check and unpack the parts that benchmarks/pack_wheels.sh wrote (FROM/pack-1 ... FROM/pack-N) into a
# site-packages folder, then print the PYTHONPATH entry to use.
#
#   bash benchmarks/unpack_wheels.sh [FROM=.whl] [TO=/tmp/site] [NAME=pack]
#
# NAME picks another pack (ffcv-pack: FROM/ffcv-pack-1 ..., from benchmarks/build_ffcv_kit.sh).
# Exit status: 0 unpacked (or already unpacked from the same archive), 1 no parts found, 2 parts missing or corrupt,
# 3 this machine's glibc is older than the pack needs (which ones, and why, is said on stderr; nothing is unpacked).
# A libstdc++ older than the pack asks for is a warning on stderr (the libraries that need it fail to load).
set -euo pipefail

FROM=${1:-.whl}
TO=${2:-/tmp/site}
NAME=${3:-pack}
mapfile -t MANIFESTS < <(ls "$FROM/$NAME"-*/MANIFEST 2>/dev/null || true)
if (( ${#MANIFESTS[@]} == 0 )); then
    echo "no packed packages under $FROM/$NAME-*" >&2
    exit 1
fi
field() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
SUM=$(field sha256 "${MANIFESTS[0]}")
N=$(field parts "${MANIFESTS[0]}")
for m in "${MANIFESTS[@]}"; do
    if [ "$(field sha256 "$m")" != "$SUM" ]; then
        echo "$m belongs to another packing than ${MANIFESTS[0]}: pack again and bring all parts" >&2
        exit 2
    fi
done
NEED=$(field glibc "${MANIFESTS[0]}")   # absent in packs written before the MANIFEST said it
HAVE=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{ print $2 }' || true)
if [ -n "$NEED" ] && [ "$NEED" != 0 ] && [ -n "$HAVE" ] \
        && [ "$(printf '%s\n%s\n' "$NEED" "$HAVE" | sort -V | head -n 1)" != "$NEED" ]; then
    echo "packed packages $FROM/$NAME-*: they need glibc $NEED or newer, this machine has glibc $HAVE; nothing" \
         "unpacked (rebuild them on a system whose glibc is not newer than $HAVE)" >&2
    exit 3
fi
NEEDXX=$(field glibcxx "${MANIFESTS[0]}")
STDCXX=$( (ldconfig -p 2>/dev/null || true) | awk '/libstdc\+\+\.so\.6 .*x86-64/ { print $NF; exit }')
if [ -n "$NEEDXX" ] && [ "$NEEDXX" != 0 ] && [ -n "$STDCXX" ] && [ -r "$STDCXX" ]; then
    HAVEXX=$(grep -aoE 'GLIBCXX_[0-9]+(\.[0-9]+)+' "$STDCXX" | sed 's/GLIBCXX_//' | sort -V | tail -n 1 || true)
    if [ -n "$HAVEXX" ] && [ "$(printf '%s\n%s\n' "$NEEDXX" "$HAVEXX" | sort -V | head -n 1)" != "$NEEDXX" ]; then
        echo "packed packages $FROM/$NAME-*: warning: they ask for libstdc++ GLIBCXX_$NEEDXX, $STDCXX has" \
             "GLIBCXX_$HAVEXX at most: their C++ libraries may not load" >&2
    fi
fi
if [ -f "$TO/.packed-$SUM" ]; then
    echo "$TO"
    exit 0
fi
PARTS=() MISSING=()
for (( i = 1; i <= N; i++ )); do
    f="$FROM/$NAME-$i/site.tar.xz.part-$i"
    if [ -f "$f" ]; then PARTS+=("$f"); else MISSING+=("$i"); fi
done
if (( ${#MISSING[@]} )); then
    echo "packed packages: part(s) ${MISSING[*]} of $N missing under $FROM (bring $FROM/$NAME-${MISSING[0]} ...)" >&2
    exit 2
fi
GOT=$(cat "${PARTS[@]}" | sha256sum | cut -d' ' -f1)
if [ "$GOT" != "$SUM" ]; then
    echo "packed packages: the $N parts under $FROM do not add up to the packed archive (sha256 $GOT, expected" \
         "$SUM): a part is damaged or incomplete; bring it again" >&2
    exit 2
fi
mkdir -p "$TO"
cat "${PARTS[@]}" | xz -d | tar -x -C "$TO"
touch "$TO/.packed-$SUM"
echo "$TO"
