#!/usr/bin/env bash
# A short second device call after bench/gpu_check.sh: the GPU tests a run's timeouts cut or a kernel change since
# then touches, a benchmark of the changed ops, and the training pipeline again. Every part is chosen by a variable
# (defaults: what changed after the last recheck, 2026-11-28: the descriptor's backward reductions and the mask
# logits' row norms, both parity-tested on the CPU only):
#
#   CASCADE_CLIP_COMMIT=<sha> GPU_RUN_BUDGET_S=280 bash bench/gpu_recheck.sh OUT_DIR
#
#   RECHECK_K        pytest -k expression over the GPU tests of tests/test_ops_triton.py (-m gpu)
#   RECHECK_OPS      ops benchmarked eager, compile and triton side by side, B=8 bf16 ("" skips)
#   RECHECK_CLASSES  their class counts
#   RECHECK_PIPELINE 1: bench/pipeline_run.py (300 iterations, loader workers) afterwards
# The special-value and autocast tests of every op run after the first step, and with what is left the small-shape
# Triton tests on the GPU. Same fresh-machine set-up as gpu_check.sh (bench/gpu_env.sh); same step logging, so a slow step shortens the
# later ones instead of losing the call. Writes gpu_check.log, pytest_gpu.log, bench.log, results_gpu.csv,
# results_gpu.md, results_pipeline.csv, train_check.log.
set -u

OUT=${1:?usage: bash bench/gpu_recheck.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
GPU_RUN_FIRST=1 source "$(dirname "$0")/gpu_env.sh"  # first of the device call: its deadline and benchmark run id
RECHECK_K=${RECHECK_K:-"descriptor or mask_logits or compile_fullgraph"}
RECHECK_OPS=${RECHECK_OPS-descriptor,mask_logits}
RECHECK_CLASSES=${RECHECK_CLASSES:-15,20}
RECHECK_PIPELINE=${RECHECK_PIPELINE:-1}

# 1. the GPU parity tests named by RECHECK_K
step "pytest -m gpu -k RECHECK_K" 150 "$OUT/pytest_gpu.log" $PY -m pytest -v -rfE $XDIST --durations=8 -m gpu -k "$RECHECK_K" tests/test_ops_triton.py -p no:cacheprovider
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$LOG"

# 2. special values and autocast of every op (whole files)
step "special values, autocast" 60 "$OUT/pytest_gpu.log" $PY -m pytest -v -rfE $XDIST tests/test_ops_special_values.py tests/test_ops_autocast.py -p no:cacheprovider
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$LOG"

# 3. the benchmark of the changed ops (fresh autotune: forget the choices the tests made on a shared GPU)
find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.autotune.json' -delete 2>/dev/null
if [ -n "$RECHECK_OPS" ]; then
    step "bench eager+compile+triton $RECHECK_OPS" 60 "$OUT/bench.log" $PY bench/bench_gpu.py $DRY --out "$OUT" --ops "$RECHECK_OPS" --providers eager,compile,triton --batches 8 --classes "$RECHECK_CLASSES" --dtypes bf16 --budget-s 40 --rep-ms 50
fi

# 4. the training pipeline (bench/gpu_train_check.sh's step 2)
if [ "$RECHECK_PIPELINE" = 1 ]; then
    workers=$(loader_workers)
    if [ -n "$DRY" ]; then
        step "pipeline run (tiny, dry run)" 90 "$OUT/train_check.log" $PY bench/pipeline_run.py --tiny --iters 2 --num-workers 0 --out "$(mktemp -d)" --csv "$OUT/results_pipeline.csv" --set train.eval_at_end=false
    else
        step "pipeline run ($workers workers)" 90 "$OUT/train_check.log" $PY bench/pipeline_run.py --out "$(mktemp -d)" --csv "$OUT/results_pipeline.csv" --iters 300 --num-workers "$workers" --set train.eval_at_end=false
    fi
    grep -E "img/s|^mIoU|img_per_s" "$OUT/train_check.log" | tail -n 4 | tee -a "$LOG"
fi

# 5. with what is left, the small-shape Triton tests on the GPU
step "pytest not gpu" 120 "$OUT/pytest_gpu.log" $PY -m pytest -v -rfE $XDIST -m "not gpu" tests/test_ops_triton.py tests/test_ops_loss.py -p no:cacheprovider
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$LOG"

if [ -s "$OUT/results_gpu.csv" ]; then
    step "render" 20 "$LOG" $PY bench/render_results.py "$OUT/results_gpu.csv" --md "$OUT/results_gpu.md"
fi
log "done in $(( $(date +%s) - START ))s"
