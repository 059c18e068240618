"""Inference speed of ``model.segment`` (what ``eval`` and ``predict`` run), the CLIP blocks' two attention paths side
by side.

    python bench/segment_speed.py                         # ViT-B/16 VOC model, one 512x682 image, 20 classes, CPU
    python bench/segment_speed.py --clip-model cascade-tiny --short-side 64 --rounds 2    # smoke run
    python bench/segment_speed.py --precisions fp32,bf16       # also under bf16 autocast (predict --precision bf16)

The backbone runs CLIP's blocks with their attention written out (packed q/k/v projection,
``scaled_dot_product_attention``, output projection; ``backbone.residual_attention_block``). This times that path
against open_clip's own ``nn.MultiheadAttention`` blocks (whose inference fast path materialises the attention
logits on the CPU) on the same model and image, in interleaved rounds, with random weights, no autograd, in fp32 (the
official test precision) and optionally under bf16 autocast; the median seconds per ``segment`` call and the largest
score difference between the two paths are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cascade_clip import CascadeCLIP, ModelConfig
from cascade_clip.train_config import AUTOCAST_DTYPES


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--clip-model", default="ViT-B-16")
    parser.add_argument("--short-side", type=int, default=512, help="image height (the width is 4/3 of it)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16, fp16 (autocast)")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    for precision in precisions:
        if precision not in AUTOCAST_DTYPES:
            parser.error(f"unknown precision {precision!r} (one of {', '.join(AUTOCAST_DTYPES)})")

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
    configs = [(precision, path) for precision in precisions for path in paths]

    times, scores = {config: [] for config in configs}, {}
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for precision, path in configs:
                    model.backbone.plain_blocks = paths[path]
                    dtype = AUTOCAST_DTYPES[precision]
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        scores[(precision, path)] = model.segment(image, text)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[(precision, path)].append(time.perf_counter() - start)
    finally:
        model.backbone.plain_blocks = written_out
    medians = {config: statistics.median(t) for config, t in times.items()}
    first, second = paths
    print(f"# {args.clip_model}, segment of a {tuple(image.shape[-2:])} image, {args.classes} classes, {device.type}; "
          f"median of {args.rounds} interleaved rounds")
    print("| precision | block attention | s per segment |\n|---|---|---:|")
    for (precision, path), seconds in medians.items():
        print(f"| {precision} | {path} | {seconds:.3f} |")
    differences = {}
    for precision in precisions:
        differences[precision] = (scores[(precision, first)].float() - scores[(precision, second)].float()).abs().max().item()
        ratio = medians[(precision, second)] / medians[(precision, first)]
        print(f"{precision}: written out {ratio:.2f}x; largest score difference {differences[precision]:.2e}")
    return {"seconds": medians, "max_difference": differences}


if __name__ == "__main__":
    main()
    sys.exit(0)
