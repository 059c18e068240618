#!/usr/bin/env bash
# One-call GPU check: parity tests of the Triton backend at real shapes, then the kernel benchmark.
#
#   CASCADE_CLIP_COMMIT=<sha of the tree> bash bench/gpu_check.sh OUT_DIR
#
# Made for a fresh GPU machine without network (python3 with torch, triton, pytest, pytest-benchmark; maybe no
# open_clip or torchvision). Missing wheels come from ./wheels (git-ignored; filled on a networked machine with
# `pip download --no-deps open_clip_torch==3.3.0 ftfy wcwidth -d wheels/`). Every step runs under `timeout`, is logged,
# and a failing step does not stop the next, so partial results still come back. Total under 8 minutes
# (run it with a device timeout of about 500 s).
# At most 8 files are written to OUT_DIR (the device tool returns at most 8):
#   gpu_check.log  pytest_gpu.log  bench.log  results_gpu.csv  results_gpu.md  results_gpu.png
#   results_train.csv (whole-model training steps, bench/train_speed.py)
#   results_pipeline.csv (the training pipeline end to end, bench/pipeline_run.py)
set -u

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
START=$(date +%s)

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S LOGFILE CMD...: run CMD under timeout, output to LOGFILE, record status, never abort the script
step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    log "step '$name' (timeout ${limit}s): $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then log "step '$name' ok"; elif [ $rc -eq 124 ]; then log "step '$name' TIMED OUT"; else log "step '$name' FAILED rc=$rc"; fi
    return 0
}

log "repo $REPO, out $OUT, commit ${CASCADE_CLIP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} (set CASCADE_CLIP_COMMIT: the device copy's .git may be stale)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
} | tee -a "$LOG"

# 1. wheels for what is missing (open_clip and its small deps; the Triton tests themselves need none of them)
missing=""
$PY -c "import open_clip" >/dev/null 2>&1 || missing="$missing open_clip_torch"
$PY -c "import ftfy" >/dev/null 2>&1 || missing="$missing ftfy"
$PY -c "import wcwidth" >/dev/null 2>&1 || missing="$missing wcwidth"
if [ -n "$missing" ]; then
    wheels=""
    for name in $missing; do
        for w in wheels/${name}-*.whl; do [ -e "$w" ] && wheels="$wheels $w"; done
    done
    if [ -n "$wheels" ]; then
        # into a private folder: the machine's Python environment may not be writable
        export WHEEL_SITE=$(mktemp -d)
        step "install wheels:$missing" 60 "$LOG" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WHEEL_SITE" $wheels
        export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        log "missing:$missing, but no matching file in wheels/ (carry it with the run)"
    fi
fi

# 2. make cascade_clip.kernels importable at once: a symlink cascade_clip/kernels -> ../kernels (removed on exit when
#    this script made it), the repo on PYTHONPATH; the real editable install runs in the background (its C++ build
#    may take a while; the Triton tests do not need it). Python puts the working directory first on sys.path, so a
#    separate symlinked tree would be shadowed by ./cascade_clip, which has no kernels/ subfolder.
if [ ! -e cascade_clip/kernels ]; then
    ln -s ../kernels cascade_clip/kernels
    trap 'rm -f "$REPO/cascade_clip/kernels"' EXIT
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
log "cascade_clip.kernels importable through the symlink cascade_clip/kernels; editable install starts in the background"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then  # local dry runs: leave this machine's install alone
    ( echo "rc=skipped (GPU_CHECK_SKIP_INSTALL=1)" >"$OUT/.pip.log" ) &
else
    ( CASCADE_CLIP_NO_CUDA=1 timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/.pip.log" 2>&1
      echo "rc=$?" >>"$OUT/.pip.log" ) &
fi
PIP_PID=$!
$PY -c "from cascade_clip import ops; print('backends:', ops.available_backends(), ops.unavailable_reason('triton'))" 2>&1 | tee -a "$LOG"

# without a GPU (a local check of this script) the benchmark runs its --dry-run: CPU interpreter, tiny shapes
DRY=""
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || { DRY="--dry-run"; log "no CUDA: benchmark in --dry-run mode"; }

# pytest-xdist (in the H200 image) spreads the tests over processes: most of their time is Triton compiling and
# autotuning each new shape on the CPU, which parallelises; without it the tests run in one process
XDIST=""
$PY -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"

# 3. correctness first: the GPU parity tests at real shapes (bf16 dot paths included)
step "pytest -m gpu" 90 "$OUT/pytest_gpu.log" $PY -m pytest -v -rfE $XDIST --durations=8 -m gpu tests/test_ops_triton.py -p no:cacheprovider
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$LOG"

# 3b. the whole model against the official implementation's golden tensors, on the GPU, through the reference, auto
#     and triton backends (fp32). ../shared does not travel: carry a copy in .golden/ (git-ignored), see the README.
if [ -f .golden/voc_tiny.pt ]; then
    step "golden parity" 45 "$OUT/pytest_gpu.log" env CASCADE_CLIP_GOLDEN=.golden/voc_tiny.pt $PY -m pytest -v -rfE tests/test_golden.py tests/test_ops_autocast.py -p no:cacheprovider
    tail -n 2 "$OUT/pytest_gpu.log" | tee -a "$LOG"
else
    log "no .golden/voc_tiny.pt carried: golden parity skipped"
fi

# 3c. the rest of the Triton test file on the GPU (small odd shapes, opcheck, torch.compile)
step "pytest not gpu" 45 "$OUT/pytest_gpu.log" $PY -m pytest -v -rfE $XDIST -m "not gpu" tests/test_ops_triton.py -p no:cacheprovider
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$LOG"

# 4. kernel benchmark at B=8 (the targets): eager official formulation vs Triton, launch and CUDA-graph timings, then
#    torch.compile of the official formulation (one compile per shape); rows appended as they come
step "bench eager+triton B=8" 60 "$OUT/bench.log" $PY bench/bench_gpu.py $DRY --out "$OUT" --providers eager,triton --batches 8 --budget-s 45 --rep-ms 50
step "bench compile B=8" 100 "$OUT/bench.log" $PY bench/bench_gpu.py $DRY --out "$OUT" --providers compile --batches 8 --budget-s 80 --rep-ms 50

# 5. end-to-end training steps of the whole model (ViT-B/16, 512 px, B=8, 15 classes; random weights, synthetic batch,
#    the data pipeline is not timed): reference vs triton ops in bf16 and fp32, then eager vs torch.compile in bf16;
#    interleaved rounds, img/s and peak memory
if [ -z "$DRY" ]; then
    step "train speed" 50 "$OUT/bench.log" $PY bench/train_speed.py --out "$OUT/results_train.csv" --backends reference,triton --rounds 2
    # 5b. the training pipeline end to end (issue 5): VOC preset, an OpenAI-format CLIP file with random weights,
    #     procedural VOC-layout data at VOC's sizes, data-loader workers, 300 iterations, checkpoint, evaluation
    step "pipeline run" 100 "$OUT/bench.log" $PY bench/pipeline_run.py --out "$(mktemp -d)" --csv "$OUT/results_pipeline.csv" --iters 300
    left=$(( 420 - ($(date +%s) - START) ))
    if [ "$left" -gt 60 ]; then
        step "train speed compiled" "$left" "$OUT/bench.log" $PY bench/train_speed.py --out "$OUT/results_train.csv" --backends triton,reference --precisions bf16 --compile none,default --rounds 2
    else
        log "no time left for the compiled training step"
    fi
else
    step "train speed (tiny, dry run)" 90 "$OUT/bench.log" $PY bench/train_speed.py --tiny --iters 1 --rounds 1 --warmup 1 --batch 2 --precisions fp32 --backends reference --out "$OUT/results_train.csv"
    step "pipeline run (tiny, dry run)" 90 "$OUT/bench.log" $PY bench/pipeline_run.py --tiny --iters 2 --num-workers 0 --out "$(mktemp -d)" --csv "$OUT/results_pipeline.csv" --set train.eval_at_end=false
fi

# 6. the other batch sizes with whatever time is left
left=$(( 430 - ($(date +%s) - START) ))
if [ "$left" -gt 20 ]; then
    step "bench eager+triton B=4,16" "$left" "$OUT/bench.log" $PY bench/bench_gpu.py $DRY --out "$OUT" --providers eager,triton --batches 4,16 --budget-s $(( left - 15 )) --rep-ms 50
else
    log "no time left for B=4 and B=16"
fi

# 7. table and plot from the CSV
if [ -s "$OUT/results_gpu.csv" ]; then
    step "render" 30 "$LOG" $PY bench/render_results.py "$OUT/results_gpu.csv" --md "$OUT/results_gpu.md" --png "$OUT/results_gpu.png"
fi

# 8. report the background install (never wait long for it)
if kill -0 "$PIP_PID" 2>/dev/null; then
    log "editable install still running after $(( $(date +%s) - START ))s; not waiting"
    kill "$PIP_PID" 2>/dev/null
else
    log "editable install: $(tail -n 1 "$OUT/.pip.log" 2>/dev/null)"
    $PY - <<'EOF' 2>&1 | tee -a "$LOG"
import subprocess, sys, os
env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
if os.environ.get("WHEEL_SITE"):  # the carried wheels, not the symlinked tree
    env["PYTHONPATH"] = os.environ["WHEEL_SITE"]
r = subprocess.run([sys.executable, "-c", "import cascade_clip.kernels, cascade_clip.ops as o; print('installed package imports; backends', o.available_backends())"], env=env, capture_output=True, text=True, cwd="/")
print((r.stdout + r.stderr).strip()[-400:])
EOF
fi
tail -n 40 "$OUT/.pip.log" >>"$LOG" 2>/dev/null
rm -f "$OUT/.pip.log"
log "done in $(( $(date +%s) - START ))s"
