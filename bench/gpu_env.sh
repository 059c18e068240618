# Shared set-up of the GPU scripts (sourced by bench/gpu_check.sh, bench/gpu_train_check.sh and bench/gpu_recheck.sh,
# never run alone).
#
# Expects OUT (an existing folder) and LOG (a file under it). Defines REPO, PY, START, log, step, loader_workers, DRY,
# XDIST and, with GPU_RUN_FIRST=1, exports CASCADE_CLIP_RUN_ID; makes open_clip importable from the carried ./wheels
# when the machine lacks it (into a private folder: the machine's Python environment may not be writable) and
# cascade_clip.kernels importable through a symlink cascade_clip/kernels -> ../kernels (removed on exit when made
# here). Python puts the working directory first on
# sys.path, so a separate symlinked tree would be shadowed by ./cascade_clip, which has no kernels/ subfolder.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)

# One deadline for the whole device call (both scripts, ~600 s): the first script (gpu_check.sh sets
# GPU_RUN_FIRST=1) writes it to a file outside OUT (which comes back whole), the second reads it while it lies ahead.
# Every step's timeout is capped by it, so a slow early step shortens the later ones instead of losing the call.
DEADLINE_FILE="${TMPDIR:-/tmp}/cascade-clip-deadline-$(printf %s "$OUT" | cksum | cut -d' ' -f1)"
if [ "${GPU_RUN_FIRST:-0}" = 1 ] || [ ! -f "$DEADLINE_FILE" ] || [ "$(cat "$DEADLINE_FILE")" -le "$START" ]; then
    echo $(( START + ${GPU_RUN_BUDGET_S:-580} )) >"$DEADLINE_FILE"
fi
DEADLINE=$(cat "$DEADLINE_FILE")

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S LOGFILE CMD...: run CMD under timeout (capped by the deadline), output to LOGFILE, record
# status, never abort the script
step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    local remaining=$(( DEADLINE - $(date +%s) - 15 ))  # kill-after and the final log lines
    if [ "$remaining" -lt "$limit" ]; then limit=$remaining; fi
    if [ "$limit" -lt 5 ]; then log "step '$name' SKIPPED: the device call's deadline is near"; return 0; fi
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

missing=""
$PY -c "import open_clip" >/dev/null 2>&1 || missing="$missing open_clip_torch"
$PY -c "import ftfy" >/dev/null 2>&1 || missing="$missing ftfy"
$PY -c "import wcwidth" >/dev/null 2>&1 || missing="$missing wcwidth"
# pytest-xdist spreads the GPU tests over processes (see XDIST below); carried as a fallback for an image without it
$PY -c "import xdist" >/dev/null 2>&1 || missing="$missing pytest_xdist execnet"
if [ -n "$missing" ]; then
    wheels=""
    for name in $missing; do
        for w in wheels/${name}-*.whl; do [ -e "$w" ] && wheels="$wheels $w"; done
    done
    if [ -n "$wheels" ]; then
        export WHEEL_SITE=$(mktemp -d)
        step "install wheels:$missing" 60 "$LOG" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WHEEL_SITE" $wheels
        export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        log "missing:$missing, but no matching file in wheels/ (carry it with the run)"
    fi
fi

if [ ! -e cascade_clip/kernels ]; then
    ln -s ../kernels cascade_clip/kernels
    trap 'rm -f "$REPO/cascade_clip/kernels"' EXIT
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "from cascade_clip import ops; print('backends:', ops.available_backends(), ops.unavailable_reason('triton'))" 2>&1 | tee -a "$LOG"

# without a GPU (a local check of these scripts) every step runs its CPU dry run instead: interpreter, tiny shapes
DRY=""
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || { DRY="--dry-run"; log "no CUDA: dry-run mode"; }

# pytest-xdist (in the H200 image, else from wheels/) spreads tests over processes: most of their time is Triton compiling and
# autotuning each new shape on the CPU, which parallelises; without it the tests run in one process
XDIST=""
$PY -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"

# The first script of a device call (GPU_RUN_FIRST=1) names one run for every benchmark invocation after it: the
# renderer takes ratios only within a run, and a second run on the same commit (a repeat after a timeout, a stale
# .git) must not mix its rows into this one's
if [ "${GPU_RUN_FIRST:-0}" = 1 ]; then
    export CASCADE_CLIP_RUN_ID="${CASCADE_CLIP_RUN_ID:-$(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ)-$(uname -n)}"
    log "benchmark run id $CASCADE_CLIP_RUN_ID"
fi

# loader_workers: how many data-loader workers the pipeline run can use. Workers hand batches over through /dev/shm
# (~25 MB each, two in flight per worker): a small one (a container's 64 MB default) would kill the run, so fewer then.
loader_workers() {
    local shm_kb workers=8
    shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
    if [ "${shm_kb:-0}" -lt 4194304 ]; then workers=2; fi
    if [ "${shm_kb:-0}" -lt 524288 ]; then workers=0; fi
    log "/dev/shm has ${shm_kb:-?} KiB free: $workers loader workers" >&2
    echo "$workers"
}
