"""GPU benchmark of the head ops and the loss: eager official formulation vs torch.compile of it vs the Triton kernels.

    python bench/bench_gpu.py --out DIR            # all cases on the GPU, rows appended to DIR/results_gpu.csv
    python bench/bench_gpu.py --dry-run --out DIR  # CPU, Triton interpreter, tiny shapes: checks the plumbing only

Every case (op x B x C x dtype, see ``bench_common_gpu.cases``) is timed forward and forward+backward two ways
(``bench_common_gpu.TIMINGS``): "launch" with ``triton.testing.do_bench`` (host overhead counts, as in an eager loop)
and "graph" as CUDA-graph replays (GPU time only); medians with the 0.2/0.8 quantiles. The providers of ``--providers``
take their turn case by case in one process, so ``--providers eager,compile,triton`` times the three side by side.
Each row carries the median, GB/s and TFLOP/s from the formulas in ``bench_common_gpu.work``, the fraction of the copy
bandwidth and matmul peak measured at the start of the same invocation, peak memory, the card, versions, commit, date
and run id (``$CASCADE_CLIP_RUN_ID``, else one per process). Rows are appended after each case, so a run stopped by a
timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    # the kernels can only run under the interpreter here; it must be set before cascade_clip.kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common_gpu as common  # noqa: E402


def _ints(text: str):
    return tuple(int(x) for x in text.split(",") if x)


def _strs(text: str):
    return tuple(x for x in text.split(",") if x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created); the CSV and log go there")
    p.add_argument("--csv", default=None, help="CSV path (default OUT/results_gpu.csv); rows are appended")
    p.add_argument("--ops", type=_strs, default=common.OPS)
    p.add_argument("--batches", type=_ints, default=common.BATCHES)
    p.add_argument("--classes", type=_ints, default=common.CLASSES)
    p.add_argument("--dtypes", type=_strs, default=common.DTYPES)
    p.add_argument("--providers", type=_strs, default=None,
                   help=f"default {','.join(common.PROVIDERS)}; a dry run leaves compile out unless named here")
    p.add_argument("--modes", type=_strs, default=common.MODES)
    p.add_argument("--timings", type=_strs, default=common.TIMINGS,
                   help="launch (do_bench: host overhead counts) and/or graph (CUDA-graph replay: GPU time only)")
    p.add_argument("--compile-batches", type=_ints, default=(8,),
                   help="batches at which the torch.compile provider runs (each shape is a fresh compile)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench's timing budget per measurement")
    p.add_argument("--budget-s", type=float, default=0.0, help="stop starting new cases after this many seconds")
    p.add_argument("--skip-measured", action="store_true",
                   help="skip the cases the CSV already has rows of from this run id (an earlier step of the same "
                        "gpu_check.sh run): re-timing them in another process would replace rows that were measured "
                        "side by side")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU and the Triton interpreter, tiny shapes: exercises args and CSV (torch.compile, slow on "
                        "the CPU, only when --providers names it)")
    args = p.parse_args(argv)
    args.explicit_providers = args.providers is not None
    if args.providers is None:
        args.providers = common.PROVIDERS
    choices = (("dtype", args.dtypes, sorted(common.DTYPE_OF)), ("provider", args.providers, common.PROVIDERS),
               ("mode", args.modes, common.MODES), ("timing", args.timings, common.TIMINGS))
    for what, given, known in choices:
        for value in given:
            if value not in known:
                p.error(f"unknown {what} {value!r}; known {known}")
    return args


def measured_cases(csv_path: str, run: str):
    """(op, variant, shape, dtype) of every row of ``run`` already in ``csv_path``; none if the file is missing or
    predates the run column."""
    if not os.path.exists(csv_path):
        return set()
    with open(csv_path, newline="") as f:
        return {(r["op"], r["variant"], r["shape"], r["dtype"]) for r in csv.DictReader(f) if r.get("run") == run}


def tuned_configs(op: str) -> list:
    """``kernel: config`` of each autotuned kernel of ``op`` as its last call chose it (the log shows, e.g., which
    image split the descriptor's forward takes at each shape)."""
    import importlib

    from cascade_clip.kernels import launch

    lines = []
    for module, name in launch.AUTOTUNE_CANDIDATES:
        if op not in module.rsplit(".", 1)[-1]:  # descriptor, mask_logits, loss(_sums)
            continue
        best = getattr(getattr(importlib.import_module(module), name), "best_config", None)
        if best is not None:
            lines.append(f"{name}: {best}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    csv_path = args.csv or os.path.join(args.out, "results_gpu.csv")
    if args.dry_run:
        device = "cpu"
        case_list = common.cases(batches=(1,), classes=(3,), dtypes=("fp32",), N=16, D=16, ops=args.ops, loss_side=8)
        providers = [p for p in args.providers if p != "compile" or args.explicit_providers]
        compile_batches = (1,)  # the tiny cases' batch
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run for the CPU plumbing check", file=sys.stderr)
            return 2
        device = "cuda"
        case_list = common.cases(batches=args.batches, classes=args.classes, dtypes=args.dtypes, ops=args.ops)
        providers = list(args.providers)
        compile_batches = args.compile_batches

    env = common.environment(device)
    peaks = common.measure_peaks(device)
    print(f"# {env['card']} torch {env['torch']} triton {env['triton']} commit {env['commit']} run {env['run']}",
          flush=True)
    if args.skip_measured:
        done = measured_cases(csv_path, env["run"])
        skipped = [c for c in case_list if (c.op, c.variant, c.shape, c.dtype) in done]
        case_list = [c for c in case_list if (c.op, c.variant, c.shape, c.dtype) not in done]
        if skipped:
            print(f"# {len(skipped)} cases already measured in run {env['run']}: skipped", flush=True)
    print(f"# measured: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['mm_bf16']:.0f} TFLOP/s, "
          f"fp32 matmul {peaks['mm_fp32']:.1f} TFLOP/s; {len(case_list)} cases -> {csv_path}", flush=True)

    start = time.time()
    failures = 0
    for case in case_list:
        if args.budget_s and time.time() - start > args.budget_s:
            print(f"# budget of {args.budget_s:.0f}s spent; stopping before {case.id}", flush=True)
            break
        rows = []
        for provider in providers:
            if provider == "compile" and case.B not in compile_batches:
                continue
            for mode in args.modes:
                try:
                    fn, inputs = common.runner(case, provider, mode, device)
                    fn()  # compile / autotune outside the timed region
                    if provider == "triton":
                        for line in tuned_configs(case.op):
                            print(f"# {case.id} {mode} tuned {line}", flush=True)
                    peak = common.peak_memory_mib(fn, inputs, device)
                    for timing in args.timings:
                        if timing == "graph" and device != "cuda":
                            continue  # no CUDA graphs on the CPU dry run
                        try:
                            if timing == "graph":
                                times = common.time_graph(fn, inputs)
                            else:
                                times = common.time_fn(fn, inputs, device, rep_ms=args.rep_ms)
                        except Exception:  # e.g. a provider that cannot be captured: keep its other rows
                            failures += 1
                            print(f"{case.id} {provider} {mode} {timing} FAILED:\n{traceback.format_exc()}", flush=True)
                            continue
                        row = common.make_row(env, peaks, case, provider, mode, timing, times, peak)
                        rows.append(row)
                        print(f"{case.id:52s} {provider:8s} {mode:8s} {timing:6s} p50 {times[0]:9.4f} ms  "
                              f"{row['gbps']:>9s} GB/s {row['tflops']:>8s} TFLOP/s  peak {row['peak_mem_mib']:>8s} MiB",
                              flush=True)
                except Exception:  # one broken provider must not lose the other rows
                    failures += 1
                    print(f"{case.id} {provider} {mode} FAILED:\n{traceback.format_exc()}", flush=True)
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
        if rows:
            common.append_rows(csv_path, rows)
    print(f"# done in {time.time() - start:.0f}s, {failures} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
