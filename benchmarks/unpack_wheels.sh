#!/usr/bin/env bash
# Join, check and unpack the parts that benchmarks/pack_wheels.sh wrote (FROM/pack-1 ... FROM/pack-N) into a
# site-packages folder, then print the PYTHONPATH entry to use.
#
#   bash benchmarks/unpack_wheels.sh [FROM=.whl] [TO=/tmp/site]
#
# Exit status: 0 unpacked (or already unpacked from the same archive), 1 no parts found, 2 parts missing or corrupt
# (which ones is said on stderr; nothing is unpacked).
set -euo pipefail

FROM=${1:-.whl}
TO=${2:-/tmp/site}
mapfile -t MANIFESTS < <(ls "$FROM"/pack-*/MANIFEST 2>/dev/null || true)
if (( ${#MANIFESTS[@]} == 0 )); then
    echo "no packed packages under $FROM/pack-*" >&2
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
if [ -f "$TO/.packed-$SUM" ]; then
    echo "$TO"
    exit 0
fi
PARTS=() MISSING=()
for (( i = 1; i <= N; i++ )); do
    f="$FROM/pack-$i/site.tar.xz.part-$i"
    if [ -f "$f" ]; then PARTS+=("$f"); else MISSING+=("$i"); fi
done
if (( ${#MISSING[@]} )); then
    echo "packed packages: part(s) ${MISSING[*]} of $N missing under $FROM (bring $FROM/pack-${MISSING[0]} ...)" >&2
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
