#!/usr/bin/env bash
# byolfast's GPU suite: first contact (DALI and FFCV on the device, the GPU tests), then ResNet-50 at 224 px on one
# GPU; about 8 minutes, without network.
#
#   bash benchmarks/gpu_suite.sh            # from anywhere; results in benchmarks/results/<card>-<date>/
#                                             (and, when BENCH_COPY_TO is set, as <card>-<date>.tar.gz plus
#                                             suite.log in that folder, rewritten after every step)
#
# Set-up, before the clock starts: wheels in .whl/ are installed with --no-index into /tmp/site; DALI's parts in
# .whl/pack-*/ (benchmarks/pack_wheels.sh) are joined and unpacked into /tmp/site-packed, the FFCV kit in
# .whl/ffcv-pack-*/ (benchmarks/build_ffcv_kit.sh) into /tmp/site-ffcv. Each step's whole output is in
# setup-<step>.log in the results folder; a step that fails is reported and the suite runs without what it brings.
# Parts, in this order, each in its own process with its own time cap and its whole output in <part>.log (a part
# that fails or runs out of time leaves the others; a benchmark JSON keeps every record measured before it stopped,
# and a failed record keeps its traceback); the caps add up to the default budget, the most wanted first:
#   smoke      import DALI and FFCV and print their versions, one `mixed` DALI batch and one FFCV -> device batch
#              (benchmarks/smoke.py; smoke.json keeps each check's full traceback)
#   gpu-tests  pytest -v -x -m gpu with a per-test timeout, the value tests first (DALI's GPU ops against its CPU
#              twin, FFCV's CUDA path against its CPU path); gpu-tests.xml is the JUnit report
#   e2e        the model fed by each loader, against model-only measured in the same run
#   loader     dali / ffcv / torch on the same real JPEGs (whichever import), and the batched device augmentation
#   ema        the target update of ResNet-50 + projector: fused, loop, and the bandwidth bound
#   model      BYOL steps on synthetic data: bf16 / fp16 / fp32(TF32), channels-last vs contiguous, fused vs loop EMA,
#              flops per image and the fraction of a measured 8192^3 bf16 matmul
#   profile    a short torch.profiler run with the bottleneck report
#   compile    the torch.compile variant (only with BENCH_COMPILE=1; compiling takes minutes)
#   e2e-stream ffcv end to end with data.ffcv.augment_stream=true (only with BENCH_STREAM=1), beside e2e's ffcv
#   epoch-start the wait at each DALI epoch start, next pipeline built ahead or not (only with BENCH_EPOCH_START=1)
#   demo       `byol demo` at GPU scale: kNN against random init, the ablation, curves (only with BENCH_DEMO=1)
# The last line (benchmarks/suite_summary.py) says which parts ran, which were skipped for a missing package (DALI,
# FFCV) and which failed; the exit status is 1 when DALI or FFCV did not run or anything failed, else 0.
# Knobs: PYTHON, BENCH_BUDGET_S (seconds for all parts, default 480), BENCH_BATCH (default 128), BENCH_IMAGES
# (benchmark JPEGs; default enough batches for the warm-up, the torch loader's read-ahead of 2 batches per core and the
# timed batches, at least 64), BENCH_COMPILE, BENCH_STREAM, BENCH_EPOCH_START, BENCH_DEMO, BENCH_ONLY (the parts to run, e.g. "demo"), BENCH_DEVICE (default cuda), BENCH_DATA (image folder, default
# /tmp/byol-bench-data), BENCH_TEST_TIMEOUT_S (per GPU test, default 90), BENCH_ARGS (more overrides, e.g.
# "model.arch=resnet18 data.image_size=32" for a quick rehearsal on a CPU).
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${BENCH_BUDGET_S:-480}
BATCH=${BENCH_BATCH:-128}
DEVICE=${BENCH_DEVICE:-cuda}
TEST_TIMEOUT=${BENCH_TEST_TIMEOUT_S:-90}
read -r -a EXTRA <<< "${BENCH_ARGS:-}"

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
: > "$LOG"
: > "$RES/parts.jsonl"

copy_out() {   # after every step, so that a run stopped from outside still brings its results back
    if [ -n "${BENCH_COPY_TO:-}" ]; then   # two files: the whole folder as one archive, and the log to read at once
        local name
        name=$(basename "$RES")
        mkdir -p "$BENCH_COPY_TO"
        tar -C "$(dirname "$RES")" -czf "$BENCH_COPY_TO/.$name.tar.gz" "$name" \
            && mv "$BENCH_COPY_TO/.$name.tar.gz" "$BENCH_COPY_TO/$name.tar.gz"
        cp "$LOG" "$BENCH_COPY_TO/suite.log"
    fi
}

record() {   # record NAME STATUS RC SECONDS CAP: one line of parts.jsonl, read by benchmarks/suite_summary.py
    printf '{"part": "%s", "status": "%s", "rc": %s, "seconds": %s, "cap": %s}\n' "$1" "$2" "$3" "$4" "$5" \
        >> "$RES/parts.jsonl"
}

run_capped() {   # run_capped NAME CAP COMMAND...: COMMAND's whole output into NAME.log; records how it ended
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS rc=0
    # SIGINT first: pytest then still writes its report, Python runs its `finally` blocks; KILL 15 s later
    timeout --signal=INT --kill-after=15 "$cap" "$@" > "$RES/$name.log" 2>&1 || rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "   $name: stopped at its ${cap} s cap (partial results kept)" | tee -a "$LOG"
        record "$name" capped "$rc" $(( SECONDS - t0 )) "$cap"
    else
        echo "   $name: exit $rc after $(( SECONDS - t0 )) s" | tee -a "$LOG"
        record "$name" exit "$rc" $(( SECONDS - t0 )) "$cap"
    fi
    grep -v -E " INFO |it/s\]|s/it\]" "$RES/$name.log" | tail -n 20
    if (( rc != 0 )); then   # the end of a failure's output in suite.log too (the whole of it is in NAME.log)
        grep -v -E " INFO |it/s\]|s/it\]" "$RES/$name.log" | tail -n 15 | sed 's/^/     | /' >> "$LOG"
    fi
    copy_out
    return "$rc"
}

setup_step() {   # setup_step NAME COMMAND...: a set-up step (outside the budget, at most 180 s), in setup-NAME.log
    local name=$1
    shift
    echo "== setup $name" | tee -a "$LOG"
    run_capped "setup-$name" 180 "$@"
}

part() {   # part NAME CAP_S COMMAND...: run COMMAND with at most CAP_S seconds (less when the budget runs out)
    local name=$1 cap=$2
    shift 2
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then
        return 0   # not asked for in this call (BENCH_ONLY names the parts to run)
    fi
    local left=$(( BUDGET - (SECONDS - START) ))
    if (( left < 25 )); then
        echo "== $name: skipped, the ${BUDGET} s budget is spent" | tee -a "$LOG"
        record "$name" budget null 0 "$cap"
        return 0
    fi
    (( cap > left )) && cap=$left
    echo "== $name (at most ${cap} s; $(( SECONDS - START )) s elapsed)" | tee -a "$LOG"
    run_capped "$name" "$cap" "$@" || true
}

{
    echo "card: $CARD    host: $(hostname)    date: $(date -Is)    git: $(git rev-parse --short HEAD 2>/dev/null || echo -)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || true
} | tee -a "$LOG"

# --- set-up: the packages this machine lacks, from the files brought with the repository ---------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
    setup_step wheels "$PY" -m pip install --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl \
        || echo "   some wheels did not install (setup-wheels.log): the suite runs with the others" | tee -a "$LOG"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".whl/pack-*/MANIFEST" > /dev/null; then   # DALI, packed in parts by benchmarks/pack_wheels.sh
    if setup_step dali-pack bash benchmarks/unpack_wheels.sh .whl /tmp/site-packed; then
        export PYTHONPATH="/tmp/site-packed${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "   DALI's parts were not unpacked (setup-dali-pack.log): the suite runs without them" | tee -a "$LOG"
    fi
fi
if compgen -G ".whl/ffcv-pack-*/MANIFEST" > /dev/null; then   # FFCV, built and packed by benchmarks/build_ffcv_kit.sh
    if setup_step ffcv-kit bash benchmarks/unpack_wheels.sh .whl /tmp/site-ffcv ffcv-pack; then
        export PYTHONPATH="/tmp/site-ffcv${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "   the FFCV kit was not unpacked (setup-ffcv-kit.log): the suite runs without FFCV" | tee -a "$LOG"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the repository is not installed there: import it from here
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib
import os
for name in ("torch", "torchvision", "numpy", "PIL", "yaml", "matplotlib", "skimage", "tqdm", "nvidia.dali", "ffcv",
             "cupy", "numba", "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<14} {getattr(mod, '__version__', '?'):<14} {os.path.dirname(mod.__file__ or '')}")
    except Exception as err:  # report every missing or broken package, keep going
        print(f"  {name:<14} MISSING ({type(err).__name__}: {err})")
PYEOF
copy_out

# --- the parts -----------------------------------------------------------------------------------------------------
START=$SECONDS
CORES=$(nproc 2>/dev/null || echo 16)
BATCHES=$(( 2 * CORES + 20 > 64 ? 2 * CORES + 20 : 64 ))
IMAGES=${BENCH_IMAGES:-$(( BATCHES * BATCH ))}   # one count for every part: the JPEGs and their conversions are reused
BENCH=("$PY" -m byolfast.benchmarks.bench --data "$DATA" --images "$IMAGES" train.batch_size="$BATCH" train.device="$DEVICE"
       ${EXTRA[@]+"${EXTRA[@]}"})
FIRST=(tests/test_dali_gpu_values.py tests/test_ffcv_cuda.py)   # the value tests, before the other GPU tests
TESTS=("${FIRST[@]}")
for f in tests/test_*.py; do   # only modules with GPU tests: the others may import what this machine lacks
    grep -q "mark.gpu" "$f" || continue   # (hypothesis, say), and one collection error ends the -x session
    [[ " ${FIRST[*]} " == *" $f "* ]] || TESTS+=("$f")
done
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
    TIMEOUT_ARGS=(--timeout="$TEST_TIMEOUT")
else
    echo "   pytest-timeout is not installed: the GPU tests run without a per-test timeout" | tee -a "$LOG"
fi
part smoke      60 "$PY" -m byolfast.benchmarks.smoke --out "$RES/smoke.json" --device "$DEVICE" --work "$DATA/smoke"
# -p byolfast.benchmarks.pytest_gpu_suite: a test module that needs a package not installed is skipped (not a collection
# error, which would end the -x session before the other package's tests); the cap's SIGINT still gets the report
part gpu-tests 140 "$PY" -m pytest -v -x -rA -p no:cacheprovider -p byolfast.benchmarks.pytest_gpu_suite -m gpu \
    ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} --junitxml="$RES/gpu-tests.xml" -o junit_logging=system-out "${TESTS[@]}"
part e2e       100 "${BENCH[@]}" --what e2e --out "$RES/e2e.json" --warmup 4 --steps 10 --repeats 2
part loader     60 "${BENCH[@]}" --what loader --out "$RES/loader.json" --loader-warmup 4 --loader-steps 10
part ema        30 "${BENCH[@]}" --what ema --out "$RES/ema.json" --ema-iters 20
part model      60 "${BENCH[@]}" --what model --out "$RES/model.json" --warmup 8 --steps 15 --repeats 3
# The trace (tens of MB) stays on the machine; the report comes back.
rm -rf "$DATA/profile"
part profile    30 "$PY" -m byolfast.benchmarks.profile --steps 5 --out "$DATA/profile" data.backend=synthetic \
    train.batch_size="$BATCH" train.device="$DEVICE" ${EXTRA[@]+"${EXTRA[@]}"}
mkdir -p "$RES/profile" && cp "$DATA"/profile/report.* "$DATA"/profile/ops.txt "$RES/profile/" 2> /dev/null
if [ "${BENCH_COMPILE:-0}" = "1" ]; then
    part compile 240 "${BENCH[@]}" --what model --variants compile --compile --out "$RES/compile.json" \
        --warmup 5 --steps 10 --repeats 2
fi
if [ "${BENCH_STREAM:-0}" = "1" ]; then   # FFCV's augmentation on its own CUDA stream, against the e2e part's ffcv
    part e2e-stream 100 "${BENCH[@]}" --what e2e --backends ffcv --out "$RES/e2e-stream.json" --warmup 4 --steps 10 \
        --repeats 2 data.ffcv.augment_stream=true
fi
if [ "${BENCH_EPOCH_START:-0}" = "1" ]; then   # DALI (nvJPEG) pipelines built per epoch: the consumer's wait
    part epoch-start 90 "$PY" -m byolfast.benchmarks.epoch_start --data "$DATA/epoch-start" --size 224 \
        --batch "$BATCH" --images "$(( BATCH * 24 ))" --threads "$(( CORES > 8 ? 8 : CORES ))" --epochs 3 \
        --out "$RES/epoch_start.json"
fi
if [ "${BENCH_DEMO:-0}" = "1" ]; then   # the demo at GPU scale (10x the epochs): its kNN curve against random init
    part demo    240 "$PY" -m byolfast demo --out "$DATA/demo" data.num_workers="$(( CORES > 8 ? 8 : CORES ))" \
        train.ckpt_every=0 ${EXTRA[@]+"${EXTRA[@]}"}
    mkdir -p "$RES/demo" && cp "$DATA"/demo/summary.json "$DATA"/demo/curves.png "$RES/demo/" 2> /dev/null
    cp "$DATA"/demo/byol/metrics.jsonl "$RES/demo/byol-metrics.jsonl" 2> /dev/null   # (the checkpoints stay there)
fi
echo "parts done in $(( SECONDS - START )) s: $RES" | tee -a "$LOG"

# --- the last line: what ran, what was skipped for a missing package, what failed ----------------------------------
"$PY" -m byolfast.benchmarks.suite_summary "$RES" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
if (( STATUS != 0 && STATUS != 1 )); then   # the summary itself broke: still end with a line that says so
    echo "suite: the summary failed (exit $STATUS; parts.jsonl says how each part ended) -> exit 2" | tee -a "$LOG"
    STATUS=2
fi
copy_out
exit "$STATUS"
