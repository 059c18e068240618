"""CPU benchmark of the three head ops and the loss: eager official formulation, torch.compile of it, reference, cpp.

    python bench/bench_cpu.py --out bench/results_cpu.csv [--ops nga,descriptor,mask_logits,loss] [--min-run-time 2]

Times every (op, provider, mode) at the VOC training shapes (see ``bench_common_cpu.py``) with
``torch.utils.benchmark.Timer.blocked_autorange``; the providers of one (op, mode) take turns in several rounds so that
the ratios come from one run under the same machine load (this machine's 2 cores are shared). Rows are *appended*
to the CSV (old rows are never rewritten) and a markdown table with the cpp/eager and cpp/compile speedups is
printed for ``bench/RESULTS.md``.

After all timing, a child process measures each case's peak memory twice (:func:`measure_memory`): the profiler's
allocations (a lower bound) and the true resident peak (:func:`peak_resident_mb`); ``--no-memory`` skips it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import warnings

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler (memory pass) quiet; read when torch loads

import torch  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common_cpu as common  # noqa: E402
from results_io import append_rows, git_commit  # noqa: E402
from cascade_clip.info import cpu_name  # noqa: E402

FIELDS = [
    "date", "git_commit", "cpu", "threads", "torch", "op", "provider", "mode", "shape", "dtype",
    "median_ms", "iqr_ms", "p20_ms", "p80_ms", "runs", "peak_mem_mb", "load_avg", "peak_rss_mb",
]


def peak_memory_mb(step) -> float:
    """Peak CPU memory torch allocates during one ``step()`` beyond what existed before it (MB): the running sum of
    the profiler's per-op self allocations and frees, in time order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


# glibc reads this at start-up: every block of 128 KiB or more then gets a mapping of its own, returned to the kernel
# when freed. It also turns off glibc's dynamic threshold, which rises to the largest block freed so far (up to 32
# MiB) and serves later blocks from a heap whose fragments can count one freed-and-reallocated tensor twice.
PRIVATE_MAPPINGS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _reset_resident_peak() -> int:
    """Hand glibc's free heap pages back to the kernel, reset ``VmHWM`` and return ``VmRSS`` (KiB). OSError or
    AttributeError where Linux's counters or glibc are missing."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status_kb("VmRSS")


def peak_resident_mb(step) -> float:
    """Peak resident memory one ``step()`` adds to the process (MB), NaN where Linux's counters are missing.

    Unlike :func:`peak_memory_mb` this is a true peak: it sees memory an op allocates and frees inside itself and the
    compiled graphs' buffers. In a process started with :data:`PRIVATE_MAPPINGS_ENV`, where each tensor of 128 KiB or
    more has pages of its own (``malloc_trim`` returns what the small-block heap keeps), it is the step's peak of live
    memory to about 0.5 MiB (pages the interpreter itself touches or frees during the step count too): writing 5 to
    ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``, which the step then raises by its peak above the
    resident size before it. Memory a library keeps from an earlier call (a warm step's caches) is not counted, and
    an allocator preloaded in place of glibc's (``LD_PRELOAD``) would not follow the setting."""
    try:
        before = _reset_resident_peak()
    except (OSError, AttributeError):  # not Linux/glibc, or /proc not writable
        return float("nan")
    step()
    return (_status_kb("VmHWM") - before) * 1024 / 2**20


def memory_pass(cases) -> None:
    """Child-process side of :func:`measure_memory`: one JSON line ``[op, provider, mode, profiler MB, resident MB]``
    per case, each step built afresh and warmed up, its gradients cleared before each pass."""
    for op, provider, mode in cases:
        step = common.make_step(op, provider, mode)
        step()
        step()  # compiles, first-call caches
        step.clear_grads()
        allocated = peak_memory_mb(step)
        step.clear_grads()
        resident = peak_resident_mb(step)
        print(json.dumps([op, provider, mode, allocated, resident]), flush=True)


def measure_memory(cases) -> dict:
    """``{(op, provider, mode): (profiler MB, resident MB)}``, measured in a child process started with
    :data:`PRIVATE_MAPPINGS_ENV` (the allocator setting would change the timed steps' page faults in this one)."""
    env = dict(os.environ, **PRIVATE_MAPPINGS_ENV)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-pass", json.dumps(cases)], env=env,
                            capture_output=True, text=True)
    if result.returncode:  # the timing rows are still written, with NaN for what the pass did not measure
        print(f"warning: the memory pass failed (exit status {result.returncode}); the cases it did not reach get NaN "
              f"memory columns:\n{result.stderr[-4000:]}", file=sys.stderr, flush=True)
    measured = {}
    for line in result.stdout.splitlines():
        if line.startswith("["):
            op, provider, mode, allocated, resident = json.loads(line)
            measured[op, provider, mode] = (allocated, resident)
    return measured


def measure_interleaved(steps: dict, min_run_time: float, rounds: int) -> dict:
    """Per provider ``(median, iqr, p20, p80, runs)`` in seconds. The providers take turns for ``rounds`` rounds, so
    that load from other processes on this shared machine spreads evenly over them and the ratios stay comparable."""
    for step in steps.values():  # warm-up (compiles the torch.compile provider)
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            # Timer runs its statement with num_threads=1 unless told otherwise: time with the threads the row records
            m = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
                min_run_time=min_run_time / rounds)
            times[name].extend(m.times)
    result = {}
    for name, ts in times.items():
        ts = sorted(ts)
        q = statistics.quantiles(ts, n=20) if len(ts) >= 2 else [ts[0]] * 19  # 5% steps
        result[name] = (statistics.median(ts), q[14] - q[4], q[3], q[15], len(ts))  # IQR = p75 - p25
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_cpu.csv"))
    parser.add_argument("--ops", default=",".join(common.OPS))
    parser.add_argument("--providers", default=",".join(common.PROVIDERS))
    parser.add_argument("--modes", default=",".join(common.MODES))
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per provider")
    parser.add_argument("--rounds", type=int, default=5, help="turns the providers take (see measure_interleaved)")
    parser.add_argument("--no-memory", action="store_true", help="skip the two passes that measure peak memory")
    parser.add_argument("--memory-pass", metavar="CASES", help=argparse.SUPPRESS)  # the child of measure_memory
    args = parser.parse_args(argv)
    if args.memory_pass:
        memory_pass(json.loads(args.memory_pass))
        return 0

    providers = [p for p in args.providers.split(",") if p in common.available_providers()]
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "git_commit": git_commit(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"# {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['git_commit']}", flush=True)
    rows = []
    for op in args.ops.split(","):
        shape = common.case_shape(op)
        for mode in args.modes.split(","):
            steps = {provider: common.make_step(op, provider, mode) for provider in providers}
            measured = measure_interleaved(steps, args.min_run_time, args.rounds)
            for provider in steps:
                median, iqr, p20, p80, runs = measured[provider]
                rows.append(dict(meta, op=op, provider=provider, mode=mode, shape=shape, dtype="float32",
                                 median_ms=f"{median * 1e3:.4f}", iqr_ms=f"{iqr * 1e3:.4f}", p20_ms=f"{p20 * 1e3:.4f}",
                                 p80_ms=f"{p80 * 1e3:.4f}", runs=runs, load_avg=f"{os.getloadavg()[0]:.2f}"))
                print(f"{op:12s} {mode:8s} {provider:10s} {median * 1e3:9.3f} ms  IQR {iqr * 1e3:7.3f}", flush=True)

    nan = (float("nan"), float("nan"))
    memory = {} if args.no_memory else measure_memory([[r["op"], r["provider"], r["mode"]] for r in rows])
    for row in rows:
        mem, rss = memory.get((row["op"], row["provider"], row["mode"]), nan)
        row.update(peak_mem_mb=f"{mem:.1f}", peak_rss_mb=f"{rss:.1f}")
        print(f"{row['op']:12s} {row['mode']:8s} {row['provider']:10s} peak {mem:7.1f} MB allocated (profiler), "
              f"{rss:7.1f} MB resident", flush=True)

    try:  # append: old rows are kept; a file with other columns is refused, never rewritten to a new schema
        append_rows(args.out, FIELDS, rows)
    except ValueError as exc:
        print(f"error: {exc}; use another --out", file=sys.stderr)
        return 1

    print("\n| op | mode | eager ms | compile ms | reference ms | cpp ms | cpp/eager | cpp/compile |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    by_key = {(r["op"], r["mode"], r["provider"]): float(r["median_ms"]) for r in rows}
    for op in args.ops.split(","):
        for mode in args.modes.split(","):
            t = {p: by_key.get((op, mode, p)) for p in common.PROVIDERS}
            cells = [f"{t[p]:.3f}" if t[p] else "-" for p in common.PROVIDERS]
            ratio = lambda base: f"{t[base] / t['cpp']:.2f}x" if t[base] and t["cpp"] else "-"  # noqa: E731
            print(f"| {op} | {mode} | " + " | ".join(cells) + f" | {ratio('eager')} | {ratio('compile')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
