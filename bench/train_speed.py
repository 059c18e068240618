"""End-to-end training-step speed: the full model, forward + official loss + backward + AdamW step, per ops backend.

    python bench/train_speed.py --out bench/results_train.csv                  # GPU: ViT-B/16, 512 px, B=8, C=15
    python bench/train_speed.py --tiny --iters 2 --warmup 1 --out /tmp/t.csv   # CPU smoke run (cascade-tiny, 64 px)

Random weights and a synthetic batch (the data pipeline is not timed), the VOC inductive shapes: 15 seen classes.
Every configuration (precision x backend x ``--compile`` mode) runs on the same model and inputs in one process, in
interleaved rounds, so their img/s ratios are comparable; rows (img/s, median step time over all rounds, peak memory,
card, versions, commit, date) are appended to a CSV.

    python bench/train_speed.py --out OUT.csv --backends reference,triton --compile none,default   # eager vs compiled
    python bench/train_speed.py --out OUT.csv --precisions bf16 --variants default,per-stage-decoders,foreach-adamw

``--variants`` times the step as ``train`` runs it ("default") beside earlier formulations of the same computation,
so a host-side change is measured side by side in one run: "per-stage-decoders" calls the head's three decoders one
per stage instead of batched over stages (``decoder.run_stages``), "mha-blocks" runs CLIP's blocks through
``nn.MultiheadAttention`` instead of the written-out attention, "foreach-adamw" and "for-loop-adamw" run torch's
other AdamW kernels instead of the fused one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import cascade_clip.head
from cascade_clip import CascadeCLIP, ModelConfig, ops
from cascade_clip.accumulation import AccumulatedNormalizer
from cascade_clip.decoder import run_each_stage, run_stages
from cascade_clip.loss import loss_terms, normalized_loss
from cascade_clip.schedule import build_optimizer
from cascade_clip.train_config import COMPILE_MODES, OptimConfig, torch_compile_mode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import append_rows, git_commit  # noqa: E402

FIELDS = [
    "date", "run", "git_commit", "device", "torch", "triton", "model", "img_size", "batch", "classes", "precision",
    "backend", "compile", "median_step_ms", "img_per_s", "peak_mem_mb", "steps", "variant",
]
VARIANTS = ("default", "per-stage-decoders", "mha-blocks", "foreach-adamw", "for-loop-adamw")


@contextlib.contextmanager
def variant_model(model, variant: str):
    """``model`` runs the code of ``variant`` while inside: the decoders one per stage, or CLIP's blocks through
    ``nn.MultiheadAttention`` instead of the written-out attention."""
    plain_blocks = list(model.backbone.plain_blocks)
    if variant == "per-stage-decoders":
        cascade_clip.head.run_stages = run_each_stage
    elif variant == "mha-blocks":
        model.backbone.plain_blocks = [False] * len(plain_blocks)
    try:
        yield
    finally:
        cascade_clip.head.run_stages = run_stages
        model.backbone.plain_blocks = plain_blocks


def variant_adamw(variant: str) -> str:
    return {"foreach-adamw": "foreach", "for-loop-adamw": "for-loop"}.get(variant, OptimConfig().implementation)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from cascade_clip.info import cpu_name

    return cpu_name()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopped(Exception):
    """The run was asked to stop (SIGTERM from `timeout`): the rows timed so far are still written."""


def _stop(signum, frame):
    raise Stopped()


def train_loss(model, out, labels):
    """The loss as ``cascade_clip.train`` computes it: no per-step label check (a host-device sync), the official
    normalisation through the accumulation normaliser (one micro-batch)."""
    cfg = model.cfg
    terms = loss_terms(out["mask_logits"], labels, ignore_pixels=cfg.loss_ignores_ignore_pixels, validate_labels=False)
    divisor = AccumulatedNormalizer().add(terms["masks"])
    return normalized_loss(terms, divisor, focal_weight=cfg.focal_weight, dice_weight=cfg.dice_weight)["loss"]


def run_steps(net, model, optimizer, images, text, labels, *, precision: str, steps: int, device: torch.device):
    """Seconds of each of ``steps`` training steps (forward through ``net``, the official loss, backward, AdamW)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = train_loss(model, net(images, text), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV file to append rows to")
    parser.add_argument("--tiny", action="store_true", help="cascade-tiny at 64 px (a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all configurations; each round runs every configuration in turn, so a "
                             "drift of the machine (clocks, other load) falls on all of them alike")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    parser.add_argument("--compile", default="none",
                        help="comma list of torch.compile modes of the forward: none, default, reduce-overhead")
    parser.add_argument("--variants", default="default",
                        help=f"comma list of step formulations to compare: {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    modes = [m for m in args.compile.split(",") if m]
    for mode in modes:
        if mode not in COMPILE_MODES:
            parser.error(f"unknown --compile mode {mode!r}")
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown --variants entry {variant!r} (one of {', '.join(VARIANTS)})")
    if len(variants) > 1 and any(m != "none" for m in modes):
        # the variants swap model code under one compiled module: dynamo would recompile at every switch and, past
        # its recompile limit, silently run later configurations eagerly
        parser.error("--variants compares eager steps: give several variants or a --compile mode other than none, "
                     "not both")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = dict(clip_model="cascade-tiny", img_size=64, num_prompt_tokens=4) if args.tiny else {}
    cfg = ModelConfig.preset("voc", **overrides)
    torch.manual_seed(0)
    model = CascadeCLIP(cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # one optimiser per AdamW implementation (the variants of the model code share the default's)
    by_kernel = {kernel: build_optimizer(params, OptimConfig(implementation=kernel))
                 for kernel in dict.fromkeys(variant_adamw(v) for v in variants)}
    optimizers = {v: by_kernel[variant_adamw(v)] for v in variants}
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
    # one compiled wrapper per (backend, mode, variant): the backend and the model code are read while tracing, so
    # each gets its own graphs
    configs = [(p, b, m, v) for p in args.precisions.split(",") for b in backends for m in modes for v in variants]
    nets, peaks = {}, {}
    times = {c: [] for c in configs}
    signal.signal(signal.SIGTERM, _stop)  # a step limit (timeout) still leaves the rows timed so far
    try:
        for config in configs:  # warm-up (and compile) each configuration, recording peak memory
            precision, backend, mode, variant = config
            ops.set_backend(backend)
            net = model if mode == "none" else torch.compile(model, mode=torch_compile_mode(mode))
            nets[config] = net
            for optimizer in by_kernel.values():  # peak memory with this configuration's optimiser state only
                if optimizer is not optimizers[variant]:
                    optimizer.state.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with variant_model(model, variant):
                run_steps(net, model, optimizers[variant], images, text, labels, precision=precision,
                          steps=args.warmup, device=device)
            peaks[config] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        for _ in range(args.rounds):
            for config in configs:
                precision, backend, _mode, variant = config
                ops.set_backend(backend)
                with variant_model(model, variant):
                    times[config] += run_steps(nets[config], model, optimizers[variant], images, text, labels,
                                               precision=precision, steps=args.iters, device=device)
    except Stopped:
        print("# stopped (SIGTERM): writing the configurations timed so far", flush=True)
    ops.set_backend("auto")

    rows = []
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # ratios only within one run
    for config in configs:
        if not times[config]:
            continue
        precision, backend, mode, variant = config
        step = statistics.median(times[config])
        row = dict(
            date=datetime.date.today().isoformat(), run=run, git_commit=git_commit(), device=device_name(device),
            torch=torch.__version__, triton=triton_version, model=cfg.clip_model, img_size=size, batch=args.batch,
            classes=len(cfg.seen), precision=precision, backend=backend, compile=mode,
            median_step_ms=f"{step * 1e3:.2f}", img_per_s=f"{args.batch / step:.1f}",
            peak_mem_mb=f"{peaks[config]:.0f}", steps=len(times[config]), variant=variant,
        )
        rows.append(row)
        print(f"{precision:5s} {backend:10s} compile={mode:15s} {variant:18s} {row['median_step_ms']:>9s} ms/step "
              f"{row['img_per_s']:>8s} img/s peak {row['peak_mem_mb']} MiB", flush=True)
    try:
        append_rows(args.out, FIELDS, rows)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
