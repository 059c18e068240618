"""Render the GPU benchmark CSV as a markdown table (and a PNG plot when matplotlib is installed).

    python bench/render_results.py bench/results_gpu.csv [MORE.csv ...] --md OUT.md --png OUT.png

Rows are grouped into runs: by the ``run`` column (one id per ``gpu_check.sh`` run, or per process of a manual run);
rows from before that column, which have none, by card, commit and an hour before the card's newest row, as before.
Only the latest run per card is shown (``--all``: every run), one table per run and timing ("graph": GPU time only;
"launch": host overhead included), and ratios are only ever taken between rows of one run. For every case the table
lists each provider's median time and the Triton kernel's speed-up over eager and torch.compile, its GB/s or TFLOP/s,
its fraction of the measured copy bandwidth / matmul peak, and the peak memory of eager vs Triton.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import OrderedDict
from typing import Dict, List


def load(*paths: str) -> List[Dict[str, str]]:
    rows: List[Dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    for r in rows:  # CSVs from before the "timing" column were timed with do_bench only
        r["timing"] = r.get("timing") or "launch"
        r["run"] = r.get("run") or ""  # and those from before the "run" column have no run id
    return rows


def run_of(r: Dict[str, str]) -> str:
    """The run a row belongs to: its run id; a row without one (written before the column existed) is grouped by
    its commit, the finest grouping such rows allow."""
    return r["run"] or f"commit {r['commit']}"


def _dedup(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    # within one run, a case re-timed by a later step replaces the earlier rows
    keep: Dict[tuple, Dict[str, str]] = OrderedDict()
    for r in rows:
        keep[(r["card"], run_of(r), r["timing"], r["op"], r["variant"], r["shape"], r["dtype"], r["provider"],
              r["mode"])] = r
    return list(keep.values())


def latest_runs(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """The rows of the newest run of each card (the run of its newest row); within it, the last row of each (op,
    variant, shape, dtype, provider, mode). With a run id, a run is the rows that carry it. Without (old rows), a
    run's rows share a commit and were written within an hour of its newest row."""
    by_card: Dict[str, List[Dict[str, str]]] = OrderedDict()
    for r in rows:
        by_card.setdefault(r["card"], []).append(r)
    keep: List[Dict[str, str]] = []
    for card, rs in by_card.items():
        newest = max(rs, key=lambda r: r["date"])
        if newest["run"]:
            keep += [r for r in rs if r["run"] == newest["run"]]
        else:
            keep += [r for r in rs if not r["run"] and r["commit"] == newest["commit"]
                     and r["date"][:13] >= _hour_before(newest["date"])]
    return _dedup(keep)


def runs(rows: List[Dict[str, str]]) -> List[tuple]:
    """The (card, run) groups of ``rows``, cards sorted, runs in the order they first appear."""
    groups = list(OrderedDict.fromkeys((r["card"], run_of(r)) for r in rows))
    return sorted(groups, key=lambda g: g[0])


def _hour_before(date: str) -> str:
    import datetime

    try:
        t = datetime.datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ") - datetime.timedelta(hours=1)
    except ValueError:
        return ""
    return t.strftime("%Y-%m-%dT%H")


def _f(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


TIMING_NOTES = {
    "launch": "one Python call per timed iteration, ten issued back to back between CUDA events: host overhead "
              "counts whenever it outlasts the GPU work, as in an eager training loop (rows without a run id: "
              "triton.testing.do_bench, whose L2-flush memset hid up to ~64 us of host time per call)",
    "graph": "the calls captured in one CUDA graph and replayed: GPU time only, no L2 flush between calls",
}


# The descriptor's flops are the official [T*g, T] GEMM's; the kernel computes the text half once per image group and
# so does fewer. Its TFLOP/s and fraction of the matmul peak are official-equivalent rates, marked as such.
EQUIV_MARK = "†"
EQUIV_NOTE = (f"{EQUIV_MARK} descriptor: official-equivalent TFLOP/s and fraction of the matmul peak (the official "
              "`[T*g, T]` GEMM's flops over the kernel's time); the kernel computes the text half once per image "
              "group, so it does fewer flops than that and its own rate is lower.")
LEGACY_NOTE = ("Rows without a run id predate the corrected benchmark: their eager (and compile) providers sliced "
               "stacked inputs, whose backward zero-fills a full-size gradient per slice (eager fwd+bwd times and "
               "the speed-ups over them too high), and their descriptor and mask_logits fwd+bwd GB/s and frac copy "
               "BW counted 2*in + 2*out bytes instead of 3*in + 2*out (too low).")


def _equiv(row: Dict[str, str], field: str) -> str:
    value = row.get(field, "-")
    return f"{value}{EQUIV_MARK}" if row.get("op") == "descriptor" and value != "-" else value


def table(rows: List[Dict[str, str]]) -> str:
    """One section per (card, run), one table per timing in it: every ratio compares rows of one run."""
    cases: Dict[tuple, Dict[str, Dict[str, str]]] = OrderedDict()
    for r in rows:
        key = (r["card"], run_of(r), r["timing"], r["op"], r["variant"], r["shape"], r["dtype"], r["mode"])
        cases.setdefault(key, {})[r["provider"]] = r
    lines = []
    for card, run in runs(rows):
        mine = [r for r in rows if r["card"] == card and run_of(r) == run]
        first = mine[0]
        run_text = f"run {first['run']}, " if first["run"] else ""
        lines.append(f"### {card} ({run_text}torch {first['torch']}, triton {first['triton']}, commit "
                     f"{first['commit']}, {first['date'][:10]}; measured copy {first['copy_gbps_measured']} GB/s)")
        lines.append("")
        if not first["run"]:
            lines += [LEGACY_NOTE, ""]
        timings = [t for t in ("graph", "launch") if any(k[:3] == (card, run, t) for k in cases)]
        for timing in timings:
            lines.append(f"**{timing} timing**: {TIMING_NOTES.get(timing, timing)}.")
            lines.append("")
            lines.append("| op | shape | dtype | mode | eager ms | compile ms | triton ms | vs eager | vs compile "
                         "| triton GB/s | triton TFLOP/s | frac copy BW | frac mm peak | peak MiB eager / triton |")
            lines.append("|" + "---|" * 14)
            for key, prov in cases.items():
                if key[:3] != (card, run, timing):
                    continue
                _, _, _, op, variant, shape, dtype, mode = key
                e, c, t = (_f(prov.get(p, {}).get("p50_ms")) for p in ("eager", "compile", "triton"))
                tr = prov.get("triton", {})
                name = f"{op} ({variant})" if variant else op
                lines.append(
                    f"| {name} | {shape} | {dtype} | {mode} | {_ms(e)} | {_ms(c)} | {_ms(t)} | {_ratio(e, t)} "
                    f"| {_ratio(c, t)} | {tr.get('gbps', '-')} | {_equiv(tr, 'tflops')} | {tr.get('frac_copy_bw', '-')} "
                    f"| {_equiv(tr, 'frac_mm_peak')} | {prov.get('eager', {}).get('peak_mem_mib', '-')} / "
                    f"{tr.get('peak_mem_mib', '-')} |"
                )
            lines.append("")
            if any(k[:4] == (card, run, timing, "descriptor") and "triton" in p for k, p in cases.items()):
                lines += [EQUIV_NOTE, ""]
    return "\n".join(lines)


def _ms(x: float) -> str:
    return "-" if x != x else f"{x:.4f}"


def _ratio(a: float, b: float) -> str:
    return "-" if a != a or b != b or b == 0 else f"{a / b:.2f}x"


# The targets (bf16, B=8): (op, mode) -> minimum speed-ups over eager and torch.compile, and NGA's fraction of
# the measured copy bandwidth. Judged on "graph" timing (the kernels' GPU time) when the run has it.
TARGETS = {
    ("nga", "fwd+bwd"): {"eager": 3.0, "compile": 1.3, "frac_copy_bw": 0.85},
    ("descriptor", "fwd"): {"eager": 2.0, "compile": 1.2},
    ("descriptor", "fwd+bwd"): {"eager": 2.0, "compile": 1.2},
    ("mask_logits", "fwd"): {"eager": 2.0, "compile": 1.2},
    ("mask_logits", "fwd+bwd"): {"eager": 2.0, "compile": 1.2},
}
MASK_MEMORY_FRACTION = 1 / 8  # mask-logits peak memory <= 1/8 of the eager per-head formulation (forward)


def targets(rows: List[Dict[str, str]], dtype: str = "bf16", batch: int = 8) -> str:
    """Markdown: each target case of the latest run, the measured ratios under both timings, and whether it is met."""
    lines = []
    for card, run in runs(rows):
        sub = [r for r in rows if r["card"] == card and run_of(r) == run and r["dtype"] == dtype
               and f",B{batch}," in f",{r['shape']},"]
        if not sub:
            continue
        by = {(r["timing"], r["op"], r["variant"], r["shape"], r["mode"], r["provider"]): r for r in sub}
        timing = "graph" if any(k[0] == "graph" for k in by) else "launch"
        run_text = f", run {sub[0]['run']}" if sub[0]["run"] else f", commit {sub[0]['commit']} (no run id)"
        lines.append(f"#### Targets on {card}{run_text}, {dtype}, B={batch} (met/missed judged on {timing} timing)")
        lines.append("")
        lines.append("| op | shape | mode | vs eager (graph) | vs compile (graph) | vs eager (launch) | vs compile (launch) "
                     "| frac copy BW | peak MiB eager / triton | target | status |")
        lines.append("|" + "---|" * 11)
        cases = OrderedDict.fromkeys((r["op"], r["variant"], r["shape"], r["mode"]) for r in sub)
        for op, variant, shape, mode in cases:
            goal = TARGETS.get((op, mode))
            if goal is None:
                continue

            def p50(t, prov):
                return _f(by.get((t, op, variant, shape, mode, prov), {}).get("p50_ms"))

            ratios = {(t, prov): p50(t, prov) / p50(t, "triton") for t in ("graph", "launch") for prov in ("eager", "compile")}
            tr = by.get((timing, op, variant, shape, mode, "triton"), {})
            eager_row = by.get((timing, op, variant, shape, mode, "eager"), {})
            checks, missing = [], []
            for prov in ("eager", "compile"):
                value = ratios[(timing, prov)]
                if value != value:
                    missing.append(prov)
                else:
                    checks.append(value >= goal[prov])
            frac = _f(tr.get("frac_copy_bw"))
            if "frac_copy_bw" in goal:
                checks.append(frac >= goal["frac_copy_bw"]) if frac == frac else missing.append("bandwidth")
            peak_e, peak_t = _f(eager_row.get("peak_mem_mib")), _f(tr.get("peak_mem_mib"))
            if op == "mask_logits" and mode == "fwd" and peak_e == peak_e and peak_t == peak_t:
                checks.append(peak_t <= peak_e * MASK_MEMORY_FRACTION)
            goal_text = ", ".join(
                [f">= {goal['eager']}x eager", f">= {goal['compile']}x compile"]
                + ([f">= {goal['frac_copy_bw']:.0%} copy BW"] if "frac_copy_bw" in goal else [])
                + (["peak <= 1/8 eager"] if op == "mask_logits" and mode == "fwd" else [])
            )
            status = "missed" if not all(checks) else ("met" if not missing else "met so far")
            if missing:
                status += f" ({', '.join(missing)} not measured)"
            name = f"{op} ({variant})" if variant else op
            lines.append(
                f"| {name} | {shape} | {mode} | {_ratio(p50('graph', 'eager'), p50('graph', 'triton'))} "
                f"| {_ratio(p50('graph', 'compile'), p50('graph', 'triton'))} "
                f"| {_ratio(p50('launch', 'eager'), p50('launch', 'triton'))} "
                f"| {_ratio(p50('launch', 'compile'), p50('launch', 'triton'))} "
                f"| {tr.get('frac_copy_bw', '-') if op == 'nga' else '-'} | {eager_row.get('peak_mem_mib', '-')} / "
                f"{tr.get('peak_mem_mib', '-')} | {goal_text} | {status} |"
            )
        lines.append("")
    return "\n".join(lines)


def _label(r: Dict[str, str]) -> str:
    return f"{r['variant']}{' ' if r['variant'] else ''}{r['shape']} {r['dtype']} {r['mode']}"


def plot(rows: List[Dict[str, str]], path: str, dpi: int = 100) -> bool:
    """Bars of each provider's median per case: one row of panels (one per op) per (card, run), so bars of different
    cards or runs never share a panel; each panel's timing is graph when the run has it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return False
    groups = runs(rows)
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(max(1, len(groups)), max(1, len(ops)),
                             figsize=(6 * max(1, len(ops)), 5 * max(1, len(groups))), squeeze=False)
    for axes_row, (card, run) in zip(axes, groups):
        mine = [r for r in rows if r["card"] == card and run_of(r) == run]
        timing = "graph" if any(r["timing"] == "graph" for r in mine) else "launch"
        mine = [r for r in mine if r["timing"] == timing]
        for ax, op in zip(axes_row, ops):
            sub = [r for r in mine if r["op"] == op]
            labels = list(OrderedDict.fromkeys(_label(r) for r in sub))
            for j, prov in enumerate(("eager", "compile", "triton")):
                p50 = {_label(r): _f(r["p50_ms"]) for r in sub if r["provider"] == prov}
                ys = [p50.get(lab, float("nan")) for lab in labels]
                ax.bar([i + 0.27 * (j - 1) for i in range(len(labels))], ys, width=0.27, label=prov)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel(f"median ms, {timing} timing (log)")
            ax.set_title(f"{op}: {card}, {run}", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    if path.lower().endswith(".png"):
        # a bar chart has a handful of colours: a 64-colour palette PNG is a third of the size of an RGBA one (the
        # plot is kept in the repository). Pillow comes with matplotlib.
        from io import BytesIO

        from PIL import Image

        buffer = BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)
    else:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="*", default=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_gpu.csv")],
                   help="one or more CSVs (e.g. the repository's and a new run's, whose headers may differ)")
    p.add_argument("--md", default=None, help="write the markdown here (default: print it)")
    p.add_argument("--png", default=None, help="write a plot here (needs matplotlib)")
    p.add_argument("--all", action="store_true", help="every run, not only the latest run per card")
    args = p.parse_args(argv)
    rows = load(*args.csv)
    if not rows:
        print(f"{', '.join(args.csv)} has no rows", file=sys.stderr)
        return 1
    rows = _dedup(rows) if args.all else latest_runs(rows)
    md = targets(rows) + "\n" + table(rows)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    else:
        print(md)
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
