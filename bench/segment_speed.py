"""Inference speed of ``model.segment`` (what ``eval`` and ``predict`` run), the CLIP blocks' two attention paths side
by side.

    python bench/segment_speed.py                         # ViT-B/16 VOC model, one 512x683 image, 20 classes, CPU
    python bench/segment_speed.py --clip-model cascade-tiny --short-side 64 --rounds 2    # smoke run

The backbone runs CLIP's blocks with their attention written out (packed q/k/v projection,
``scaled_dot_product_attention``, output projection; ``backbone.residual_attention_block``). This times that path
against open_clip's own ``nn.MultiheadAttention`` blocks (whose inference fast path materialises the attention
logits on the CPU) on the same model and image, in interleaved rounds, with random weights, fp32, no autograd; the
median seconds per ``segment`` call and the largest score difference between the two are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cascade_clip import CascadeCLIP, ModelConfig


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-model", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=512, help="image height (the width is 4/3 of it)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    overrides = {} if args.clip_model == "ViT-B-16" else dict(img_size=args.short_side, crop_size=args.short_side,
                                                               stride=args.short_side * 5 // 6)
    model = CascadeCLIP(ModelConfig.preset("voc", clip_model=args.clip_model, **overrides)).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    image = torch.randn(1, 3, args.short_side, args.short_side * 4 // 3, device=device)
    text = F.normalize(torch.randn(args.classes, model.embed_dim, device=device), dim=-1)
    written_out = list(model.backbone.plain_blocks)
    paths = {"written-out attention": written_out, "nn.MultiheadAttention": [False] * len(written_out)}

    times, scores = {name: [] for name in paths}, {}
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, plain in paths.items():
                    model.backbone.plain_blocks = plain
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    scores[name] = model.segment(image, text)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
    finally:
        model.backbone.plain_blocks = written_out
    medians = {name: statistics.median(t) for name, t in times.items()}
    first, second = paths
    difference = (scores[first] - scores[second]).abs().max().item()
    print(f"# {args.clip_model}, segment of a {tuple(image.shape[-2:])} image, {args.classes} classes, {device.type}, "
          f"fp32; median of {args.rounds} interleaved rounds")
    print("| block attention | s per segment |\n|---|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"ratio {medians[second] / medians[first]:.2f}x; largest score difference {difference:.2e}")
    return {"seconds": medians, "max_difference": difference}


if __name__ == "__main__":
    main()
    sys.exit(0)
