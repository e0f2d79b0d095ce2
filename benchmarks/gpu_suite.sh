#!/usr/bin/env bash
# byolfast's GPU benchmark suite: ResNet-50 at 224 px on one GPU, in about 7 minutes, without network.
#
#   bash benchmarks/gpu_suite.sh            # from anywhere; results in benchmarks/results/<card>-<date>/
#                                             (and, when BENCH_COPY_TO is set, as <card>-<date>.tar.gz plus
#                                             suite.log in that folder, rewritten after every part)
#
# Parts, in this order, each in its own process with its own time cap (a part that fails or runs out of time leaves
# the others, and its JSON keeps every record measured before it stopped); the caps add up to the default budget:
#   ema      the target update of ResNet-50 + projector: fused, loop, and the bandwidth bound
#   e2e      the model fed by each loader, against model-only measured in the same run
#   model    BYOL steps on synthetic data: bf16 / fp16 / fp32(TF32), channels-last vs contiguous, fused vs loop EMA,
#            flops per image and the fraction of a measured 8192^3 bf16 matmul
#   loader   dali / ffcv / torch on the same real JPEGs (whichever import), and the batched device augmentation
#   tests    the test suite's GPU-marked tests (DALI's `mixed` decoder, the GPU ops against the CPU ones, ...)
#   profile  a short torch.profiler run with the bottleneck report
#   compile  the torch.compile variant (only with BENCH_COMPILE=1; compiling takes minutes)
# Extra Python packages come as wheels in .whl/ (installed with --no-index into /tmp/site), and DALI as the parts in
# .whl/pack-*/ that benchmarks/pack_wheels.sh writes (joined and unpacked into /tmp/site-packed). Knobs: PYTHON,
# BENCH_BUDGET_S (seconds for all parts, default 420), BENCH_BATCH (default 128), BENCH_IMAGES (benchmark JPEGs;
# default enough batches for the warm-up, the torch loader's read-ahead of 2 batches per core and the timed batches,
# at least 64), BENCH_COMPILE, BENCH_DEVICE (default cuda), BENCH_DATA (image folder, default /tmp/byol-bench-data),
# BENCH_ARGS (more overrides, e.g. "model.arch=resnet18 data.image_size=32" for a quick rehearsal on a CPU).
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${BENCH_BUDGET_S:-420}
BATCH=${BENCH_BATCH:-128}
DEVICE=${BENCH_DEVICE:-cuda}
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
START=$SECONDS

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install --no-index --no-deps --upgrade --quiet --target /tmp/site .whl/*.whl > /tmp/byol-wheels.log 2>&1 \
        || echo "some wheels did not install: see /tmp/byol-wheels.log"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl/pack-*/MANIFEST" > /dev/null; then   # DALI, packed in parts by benchmarks/pack_wheels.sh
    if bash benchmarks/unpack_wheels.sh .whl /tmp/site-packed > /dev/null; then
        export PYTHONPATH="/tmp/site-packed${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the packed packages were not unpacked (see above): the suite runs without them"
    fi
fi
if compgen -G ".whl/ffcv-pack-*/MANIFEST" > /dev/null; then   # FFCV, built and packed by benchmarks/build_ffcv_kit.sh
    if bash benchmarks/unpack_wheels.sh .whl /tmp/site-ffcv ffcv-pack > /dev/null; then
        export PYTHONPATH="/tmp/site-ffcv${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the FFCV kit was not unpacked (see above): the suite runs without FFCV"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the repository is not installed there: import it from here

CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
       2>/dev/null || echo unknown)
SLUG=$(echo "$CARD" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
RES="benchmarks/results/${SLUG:-unknown}-$(date +%Y%m%d)"
DATA=${BENCH_DATA:-/tmp/byol-bench-data}
if [ -e "$RES" ]; then   # an earlier run of the day: set aside whole, so that no file of it passes for this run's
    mv "$RES" "$RES.before-$(date +%H%M%S)"
fi
mkdir -p "$RES"
LOG="$RES/suite.log"

copy_out() {   # after every part, so that a run stopped from outside still brings its results back
    if [ -n "${BENCH_COPY_TO:-}" ]; then   # two files: the whole folder as one archive, and the log to read at once
        local name
        name=$(basename "$RES")
        mkdir -p "$BENCH_COPY_TO"
        tar -C "$(dirname "$RES")" -czf "$BENCH_COPY_TO/.$name.tar.gz" "$name" \
            && mv "$BENCH_COPY_TO/.$name.tar.gz" "$BENCH_COPY_TO/$name.tar.gz"
        cp "$LOG" "$BENCH_COPY_TO/suite.log"
    fi
}

part() {   # part NAME CAP_S COMMAND...: run COMMAND with at most CAP_S seconds (less when the budget runs out)
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - (SECONDS - START) ))
    if (( left < 25 )); then
        echo "== $name: skipped, the ${BUDGET} s budget is spent" | tee -a "$LOG"
        return 0
    fi
    (( cap > left )) && cap=$left
    echo "== $name (at most ${cap} s; $(( SECONDS - START )) s elapsed)" | tee -a "$LOG"
    local t0=$SECONDS rc=0
    timeout --signal=TERM --kill-after=15 "$cap" "$@" > "$RES/$name.log" 2>&1 || rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "   $name: stopped at its ${cap} s cap (partial JSON kept)" | tee -a "$LOG"
    else
        echo "   $name: exit $rc after $(( SECONDS - t0 )) s" | tee -a "$LOG"
    fi
    grep -v -E " INFO |it/s\]|s/it\]" "$RES/$name.log" | tail -n 20
    copy_out
    return 0
}

{
    echo "card: $CARD    host: $(hostname)    date: $(date -Is)    git: $(git rev-parse --short HEAD 2>/dev/null || echo -)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import importlib
import os
for name in ("torch", "torchvision", "numpy", "PIL", "yaml", "matplotlib", "skimage", "tqdm", "nvidia.dali", "ffcv",
             "cupy", "numba"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<12} {getattr(mod, '__version__', '?'):<14} {os.path.dirname(mod.__file__ or '')}")
    except Exception as err:  # report every missing or broken package, keep going
        print(f"  {name:<12} MISSING ({type(err).__name__}: {err})")
EOF
} | tee "$LOG"

CORES=$(nproc 2>/dev/null || echo 16)
BATCHES=$(( 2 * CORES + 20 > 64 ? 2 * CORES + 20 : 64 ))
IMAGES=${BENCH_IMAGES:-$(( BATCHES * BATCH ))}   # one count for every part: the JPEGs and their conversions are reused
BENCH=("$PY" -m benchmarks.bench --data "$DATA" --images "$IMAGES" train.batch_size="$BATCH" train.device="$DEVICE"
       ${EXTRA[@]+"${EXTRA[@]}"})
part ema      40 "${BENCH[@]}" --what ema --out "$RES/ema.json" --ema-iters 20
part e2e     120 "${BENCH[@]}" --what e2e --out "$RES/e2e.json" --warmup 4 --steps 10 --repeats 2
part model    95 "${BENCH[@]}" --what model --out "$RES/model.json" --warmup 8 --steps 15 --repeats 3
part loader   70 "${BENCH[@]}" --what loader --out "$RES/loader.json" --loader-warmup 4 --loader-steps 10
part tests    60 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu -rs tests/
# The trace (tens of MB) stays on the machine; the report comes back.
rm -rf "$DATA/profile"
part profile  35 "$PY" -m benchmarks.profile --steps 5 --out "$DATA/profile" data.backend=synthetic \
    train.batch_size="$BATCH" train.device="$DEVICE" ${EXTRA[@]+"${EXTRA[@]}"}
mkdir -p "$RES/profile" && cp "$DATA"/profile/report.* "$DATA"/profile/ops.txt "$RES/profile/" 2>/dev/null && copy_out
if [ "${BENCH_COMPILE:-0}" = "1" ]; then
    part compile 240 "${BENCH[@]}" --what model --variants compile --compile --out "$RES/compile.json" \
        --warmup 5 --steps 10 --repeats 2
fi
echo "done in $(( SECONDS - START )) s: $RES" | tee -a "$LOG"
copy_out
