"""CPU benchmark of the three head ops and the loss: eager official formulation, torch.compile of it, reference, cpp.

    python bench/bench_cpu.py --out bench/results_cpu.csv [--ops nga,descriptor,mask_logits,loss] [--min-run-time 2]

Times every (op, provider, mode) at the VOC training shapes (see ``bench_common_cpu.py``) with
``torch.utils.benchmark.Timer.blocked_autorange``; the providers of one (op, mode) take turns in several rounds so that
the ratios come from one run under the same machine load (this machine's 2 cores are shared). Rows are *appended* to the CSV (old rows are never rewritten) and a markdown table with the
cpp/eager and cpp/compile speedups is printed for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
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
    "median_ms", "iqr_ms", "p20_ms", "p80_ms", "runs", "peak_mem_mb", "load_avg",
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
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler pass that measures peak memory")
    args = parser.parse_args(argv)

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
            for provider, step in steps.items():
                median, iqr, p20, p80, runs = measured[provider]
                mem = float("nan") if args.no_memory else peak_memory_mb(step)
                row = dict(meta, op=op, provider=provider, mode=mode, shape=shape, dtype="float32",
                           median_ms=f"{median * 1e3:.4f}", iqr_ms=f"{iqr * 1e3:.4f}", p20_ms=f"{p20 * 1e3:.4f}",
                           p80_ms=f"{p80 * 1e3:.4f}", runs=runs, peak_mem_mb=f"{mem:.1f}",
                           load_avg=f"{os.getloadavg()[0]:.2f}")
                rows.append(row)
                print(f"{op:12s} {mode:8s} {provider:10s} {median * 1e3:9.3f} ms  IQR {iqr * 1e3:7.3f}  "
                      f"peak {mem:7.1f} MB", flush=True)

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
