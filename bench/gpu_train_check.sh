#!/usr/bin/env bash
# The GPU check of the training side (issue 5): whole-model training steps and the pipeline end to end.
#
#   CASCADE_CLIP_COMMIT=<sha of the tree> bash bench/gpu_train_check.sh OUT_DIR      (about 4 minutes)
#
# Same fresh-machine set-up as bench/gpu_check.sh (bench/gpu_env.sh: wheels from ./wheels, no network). Run both in
# one device call, `bash bench/gpu_check.sh $OUT; bash bench/gpu_train_check.sh $OUT` (device timeout ~600 s):
# together they write 8 files, the most the device tool returns. This one writes
#   train_check.log  results_train.csv (bench/train_speed.py)  results_pipeline.csv (bench/pipeline_run.py)
set -u

OUT=${1:?usage: bash bench/gpu_train_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/train_check.log"
source "$(dirname "$0")/gpu_env.sh"

if [ -z "$DRY" ]; then
    # 1. whole-model training steps (ViT-B/16, 512 px, B=8, 15 classes; random weights, synthetic batch, the data
    #    pipeline not timed): reference vs triton ops in bf16, each as train runs it and with the decoders one per
    #    stage, CLIP's blocks through nn.MultiheadAttention or the foreach AdamW (the host-side changes since the last
    #    GPU run), interleaved rounds, img/s and peak memory. (fp32, GPU-bound at ~213 ms/step, was measured in the
    #    earlier runs.)
    step "train speed" 60 "$LOG" $PY bench/train_speed.py --out "$OUT/results_train.csv" --backends reference,triton \
        --precisions bf16 --variants default,per-stage-decoders,mha-blocks,foreach-adamw --rounds 2
    # 2. the training pipeline end to end: VOC preset, an OpenAI-format CLIP file with random weights, procedural
    #    VOC-layout data at VOC's sizes, data-loader workers (fewer with a small /dev/shm: gpu_env.sh's
    #    loader_workers), 300 iterations, checkpoint, evaluation
    workers=$(loader_workers)
    step "pipeline run" 100 "$LOG" $PY bench/pipeline_run.py --out "$(mktemp -d)" --csv "$OUT/results_pipeline.csv" \
        --iters 300 --num-workers "$workers"
    # 3. eager vs torch.compile of the bf16 step (each configuration compiles once), with what is left of ~3.7 min
    left=$(( 220 - ($(date +%s) - START) ))
    if [ "$left" -gt 50 ]; then
        step "train speed compiled" "$left" "$LOG" $PY bench/train_speed.py --out "$OUT/results_train.csv" --backends triton,reference --precisions bf16 --compile none,default --rounds 2
    else
        log "no time left for the compiled training step"
    fi
    # 4. inference (segment, fp32 and bf16, one 512x682 image): the written-out block attention vs nn.MultiheadAttention's
    step "segment speed" 30 "$LOG" $PY bench/segment_speed.py --rounds 5 --precisions fp32,bf16
else
    step "train speed (tiny, dry run)" 90 "$LOG" $PY bench/train_speed.py --tiny --iters 1 --rounds 1 --warmup 1 --batch 2 --precisions fp32 --backends reference --variants default,per-stage-decoders,mha-blocks,foreach-adamw --out "$OUT/results_train.csv"
    step "pipeline run (tiny, dry run)" 90 "$LOG" $PY bench/pipeline_run.py --tiny --iters 2 --num-workers 0 --out "$(mktemp -d)" --csv "$OUT/results_pipeline.csv" --set train.eval_at_end=false
    step "segment speed (tiny, dry run)" 60 "$LOG" $PY bench/segment_speed.py --clip-model cascade-tiny --short-side 64 --rounds 1
fi
log "done in $(( $(date +%s) - START ))s"
