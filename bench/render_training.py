"""Render the training-side results as markdown: whole-model steps (train_speed.py) and pipeline runs (pipeline_run.py).

    python bench/render_training.py --train bench/results_train.csv --pipeline bench/results_pipeline.csv

Only the newest commit's runs per device are shown, one table per run (the ``run`` column: the start time of one
train_speed.py invocation). Each table gives every (precision, backend, compile, variant) configuration's median step
time, img/s and peak memory, and its speed-up over the eager reference backend of the same precision in the same run
(and, for a run with ``--variants``, the default variant's speed-up over each other variant of the same precision,
backend and compile mode): the configurations of one run take turns in interleaved rounds, so these ratios compare
like with like. Rows of different runs are never compared.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import OrderedDict
from typing import Dict, List


def _load(path: str) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _newest_runs(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """Per device, the rows of the runs made on its newest commit (each run keeps its own rows)."""
    keep = []
    for device in OrderedDict.fromkeys(r["device"] for r in rows):
        mine = [r for r in rows if r["device"] == device]
        newest = max(mine, key=lambda r: r["run"])["git_commit"]
        keep += [r for r in mine if r["git_commit"] == newest]
    return keep


def step_table(rows: List[Dict[str, str]]) -> str:
    """One table per (device, run): a run's configurations took turns, so their ratios are comparable."""
    lines = []
    for device, run in OrderedDict.fromkeys((r["device"], r["run"]) for r in rows):
        mine = [r for r in rows if r["device"] == device and r["run"] == run]
        first = mine[0]
        lines += [
            f"#### Training steps on {device}, run {run} (torch {first['torch']}, triton {first['triton']}, commit "
            f"{first['git_commit']}; {first['model']}, {first['img_size']} px, B={first['batch']}, "
            f"{first['classes']} classes)",
            "",
            "| precision | backend | compile | variant | ms/step | img/s | peak MiB | vs eager reference (this run) "
            "| default vs this variant |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            variant = r.get("variant") or "default"
            base = next((b for b in mine if b["precision"] == r["precision"] and b["backend"] == "reference"
                         and b["compile"] == "none" and (b.get("variant") or "default") == "default"), None)
            ratio = f"{float(base['median_step_ms']) / float(r['median_step_ms']):.2f}x" if base else "-"
            default = next((b for b in mine if (b["precision"], b["backend"], b["compile"])
                            == (r["precision"], r["backend"], r["compile"]) and (b.get("variant") or "default") == "default"),
                           None)
            gain = (f"{float(r['median_step_ms']) / float(default['median_step_ms']):.2f}x"
                    if default is not None and variant != "default" else "-")
            lines.append(f"| {r['precision']} | {r['backend']} | {r['compile']} | {variant} | {r['median_step_ms']} "
                         f"| {r['img_per_s']} | {r['peak_mem_mb']} | {ratio} | {gain} |")
        lines.append("")
    return "\n".join(lines)


def pipeline_table(rows: List[Dict[str, str]]) -> str:
    lines = [
        "| device | commit | date | CLIP | crop | batch/GPU | iterations | precision | kernels | compile | img/s "
        "| peak MiB | wall s | workers |",
        "|---|---|---|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['device']} | {r['git_commit']} | {r['date']} | {r['clip_model']} | {r['img_size']} "
                     f"| {r['batch_per_gpu']} | {r['iters']} | {r['precision']} | {r['kernels']} | {r['compile']} "
                     f"| {r['img_per_s']} | {r['peak_mem_mb']} | {r['train_s']} | {r['num_workers']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--train", default=os.path.join(here, "results_train.csv"), help="train_speed.py rows")
    p.add_argument("--pipeline", default=None, help="pipeline_run.py rows (optional)")
    p.add_argument("--md", default=None, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    parts = []
    if args.train and os.path.exists(args.train):
        rows = _load(args.train)
        if rows:
            parts.append(step_table(_newest_runs(rows)))
    if args.pipeline:
        rows = _load(args.pipeline)
        if rows:
            parts.append("#### Training pipeline end to end (bench/pipeline_run.py)\n\n" + pipeline_table(rows))
    if not parts:
        print("no rows to render", file=sys.stderr)
        return 1
    md = "\n".join(parts)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(md + "\n")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
