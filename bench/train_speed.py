"""End-to-end training-step speed: the full model, forward + official loss + backward + AdamW step, per ops backend.

    python bench/train_speed.py --out bench/results_train.csv                  # GPU: ViT-B/16, 512 px, B=8, C=15
    python bench/train_speed.py --tiny --iters 2 --warmup 1 --out /tmp/t.csv   # CPU smoke run (cascade-tiny, 64 px)

Random weights and a synthetic batch (the data pipeline is not timed), the VOC inductive shapes: 15 seen classes.
Every backend runs on the same model, inputs and precision, side by side in one process, so their img/s ratios are
comparable; rows (img/s, median step time, peak memory, card, versions, commit, date) are appended to a CSV.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cascade_clip import CascadeCLIP, ModelConfig, ops

FIELDS = [
    "date", "git_commit", "device", "torch", "triton", "model", "img_size", "batch", "classes", "precision",
    "backend", "median_step_ms", "img_per_s", "peak_mem_mb", "steps",
]


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from cascade_clip.info import cpu_name

    return cpu_name()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, images, text, labels, *, precision: str, steps: int, device: torch.device):
    """Median seconds of ``steps`` training steps."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = model.loss(model(images, text), labels)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV file to append rows to")
    parser.add_argument("--tiny", action="store_true", help="cascade-tiny at 64 px (a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = dict(clip_model="cascade-tiny", img_size=64, num_prompt_tokens=4) if args.tiny else {}
    cfg = ModelConfig.preset("voc", **overrides)
    torch.manual_seed(0)
    model = CascadeCLIP(cfg).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    size = cfg.img_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    text = F.normalize(torch.randn(len(cfg.seen), model.embed_dim, device=device), dim=-1)
    labels = torch.randint(0, len(cfg.seen), (args.batch, size, size), device=device)
    labels[:, : size // 8] = 255

    backends = args.backends.split(",") if args.backends else ops.available_backends()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    rows = []
    for precision in args.precisions.split(","):
        for backend in backends:
            ops.set_backend(backend)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            time_steps(model, optimizer, images, text, labels, precision=precision, steps=args.warmup, device=device)
            step = time_steps(model, optimizer, images, text, labels, precision=precision, steps=args.iters, device=device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            row = dict(
                date=datetime.date.today().isoformat(), git_commit=git_commit(), device=device_name(device),
                torch=torch.__version__, triton=triton_version, model=cfg.clip_model, img_size=size, batch=args.batch,
                classes=len(cfg.seen), precision=precision, backend=backend, median_step_ms=f"{step * 1e3:.2f}",
                img_per_s=f"{args.batch / step:.1f}", peak_mem_mb=f"{peak:.0f}", steps=args.iters,
            )
            rows.append(row)
            print(f"{precision:5s} {backend:10s} {row['median_step_ms']:>9s} ms/step {row['img_per_s']:>8s} img/s "
                  f"peak {row['peak_mem_mb']} MiB", flush=True)
    ops.set_backend("auto")
    new_file = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
