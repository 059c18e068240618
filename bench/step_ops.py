"""ATen calls per training step: the host work of an eager step, counted (not timed) on the CPU.

    python bench/step_ops.py                      # ViT-B/16 VOC model, bf16 autocast, reference ops
    python bench/step_ops.py --backend cpp --precision fp32
    python bench/step_ops.py --clip-model cascade-tiny --time 30   # also ms per step (host-bound at this size)

An eager bf16 training step on a GPU is host-bound (bench/RESULTS.md): its time follows the number of operators
dispatched, each a few microseconds of Python and dispatcher work plus a kernel launch. This counts them with a
``TorchDispatchMode`` over one step (forward + official loss, backward, AdamW), split into phases, for three versions
of the model side by side: the backbone's blocks through open_clip's ``nn.MultiheadAttention`` ("mha") or with the
attention written out as the backbone runs them ("written-out"), and the head's three decoders called one
per stage ("per stage") or batched over stages as the head runs them (``decoder.run_stages``, "batched"). The count
does not depend on the image size (64 px here).
Counts on the CPU differ from a CUDA step in places (CPU dropout is several ops), which the
printed phases make visible.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cascade_clip.head
from cascade_clip import CascadeCLIP, ModelConfig, ops
from cascade_clip.decoder import run_each_stage, run_stages
from cascade_clip.schedule import ADAMW_IMPLEMENTATIONS, build_optimizer
from cascade_clip.train_config import OptimConfig


class CountOps(TorchDispatchMode):
    """Counts every ATen call dispatched inside the mode, by operator name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_step(model, optimizer, images, text, labels, precision: str) -> dict:
    """ATen calls of one training step by phase: forward + loss, backward, optimizer."""
    phases = {name: CountOps() for name in ("forward+loss", "backward", "optimizer")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with phases["forward+loss"]:
            loss = model.loss(model(images, text), labels)["loss"]
    with phases["backward"]:
        loss.backward()
    with phases["optimizer"]:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: mode.total for name, mode in phases.items()}


def time_step(model, optimizer, images, text, labels, precision: str) -> float:
    """Wall time (ms) of one uncounted training step."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model.loss(model(images, text), labels)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) * 1e3


def time_optimizers(params, rounds: int) -> dict:
    """Median ms of one AdamW step per implementation over ``params`` (random gradients), interleaved rounds."""
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {name: build_optimizer(params, OptimConfig(implementation=name)) for name in ADAMW_IMPLEMENTATIONS}
    saved = [p.detach().clone() for p in params]
    times = collections.defaultdict(list)
    for _ in range(rounds + 1):  # the first round creates the optimizer states
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append((time.perf_counter() - start) * 1e3)
    with torch.no_grad():  # leave the parameters as they were
        for p, value in zip(params, saved):
            p.copy_(value)
            p.grad = None
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="reference", help="ops backend (reference, cpp, triton)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture (cascade-tiny for a smoke run)")
    parser.add_argument("--adamw", default="fused", choices=tuple(ADAMW_IMPLEMENTATIONS),
                        help="torch's AdamW kernel (optim.implementation; train.py's default: fused)")
    parser.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                        help="also time the step: median ms over ROUNDS rounds, the versions interleaved")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg = ModelConfig.preset("voc", img_size=64, clip_model=args.clip_model)
    model = CascadeCLIP(cfg).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], OptimConfig(implementation=args.adamw))
    images = torch.randn(args.batch, 3, 64, 64)
    text = F.normalize(torch.randn(len(cfg.seen), model.embed_dim), dim=-1)
    labels = torch.randint(0, len(cfg.seen), (args.batch, 64, 64))
    ops.set_backend(args.backend)

    written_out = list(model.backbone.plain_blocks)
    versions = (
        ("mha", "per stage", [False] * len(written_out), run_each_stage),
        ("written-out", "per stage", written_out, run_each_stage),
        ("written-out", "batched", written_out, run_stages),
    )
    print(f"# {cfg.clip_model}, {args.precision}, backend {args.backend}, B={args.batch}; ATen calls per training step")
    print(f"| block path | decoders | forward+loss | backward | forward+backward | optimizer ({args.adamw} AdamW) |"
          + (" ms/step |" if args.time else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if args.time else ""))
    step_args = (model, optimizer, images, text, labels, args.precision)

    def use(version) -> None:
        _, _, plain, run_decoders = version
        model.backbone.plain_blocks = plain
        cascade_clip.head.run_stages = run_decoders

    results, times = {}, collections.defaultdict(list)
    try:
        for version in versions:
            use(version)
            count_step(*step_args)  # warm-up: optimizer state, caches
            results[version[:2]] = count_step(*step_args)
        for _ in range(args.time):  # interleaved, so drifts in machine load hit every version alike
            for version in versions:
                use(version)
                times[version[:2]].append(time_step(*step_args))
    finally:
        model.backbone.plain_blocks = written_out
        cascade_clip.head.run_stages = run_stages
    for key, counts in results.items():
        both = counts["forward+loss"] + counts["backward"]
        row = f"| {key[0]} | {key[1]} | {counts['forward+loss']} | {counts['backward']} | {both} | {counts['optimizer']} |"
        if args.time:
            counts["ms_per_step"] = statistics.median(times[key])
            row += f" {counts['ms_per_step']:.2f} |"
        print(row)
    if args.time:
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        print(f"\n# AdamW step alone, {len(params)} tensors, {numel:,} parameters: median ms per implementation")
        step_ms = time_optimizers(params, args.time)
        print("| " + " | ".join(step_ms) + " |\n|" + "---:|" * len(step_ms))
        print("| " + " | ".join(f"{ms:.2f}" for ms in step_ms.values()) + " |")
        results["adamw_ms"] = step_ms
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
