"""A one-batch check of a small Cascade-CLIP on synthetic images: no download, CPU-friendly (``make run`` is quickstart).

Builds the ``cascade-tiny`` CLIP (random weights) with the VOC preset, draws a batch of images with coloured shapes
and their label maps, and runs a forward pass, the official loss, a backward pass and sliding-window inference.
Random weights give noise masks: this shows the pipeline runs end to end, not segmentation quality.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from . import ops
from .catalog import image_norm
from .config import ModelConfig
from .model import CascadeCLIP


def synthetic_batch(batch: int, size: int, num_classes: int, generator: torch.Generator):
    """Images (B, 3, size, size) normalised as officially, labels (B, size, size) with rectangles of random classes
    on an ignore (255) background."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_norm())
    rgb = torch.rand(batch, 3, 1, 1, generator=generator) * 255 * torch.ones(batch, 3, size, size)
    labels = torch.full((batch, size, size), 255, dtype=torch.long)
    for b in range(batch):
        for _ in range(3):
            cls = int(torch.randint(num_classes, (1,), generator=generator))
            y, x = (int(v) for v in torch.randint(size // 2, (2,), generator=generator))
            h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
            labels[b, y : y + h, x : x + w] = cls
            rgb[b, :, y : y + h, x : x + w] = (torch.rand(3, 1, 1, generator=generator) * 255)
    return (rgb - mean) / std, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cascade-clip demo", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="ops backend (default: CASCADE_CLIP_BACKEND or auto)")
    args = parser.parse_args(argv)
    if args.backend:
        ops.set_backend(args.backend)

    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset("voc", clip_model="cascade-tiny", img_size=args.size, num_prompt_tokens=4)
    model = CascadeCLIP(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.clip_model} + cascade head, {total:,} parameters ({trainable:,} trainable)")
    print(f"ops backends available: {ops.available_backends()}, default: {ops.get_backend()}")

    generator = torch.Generator().manual_seed(args.seed)
    images, labels = synthetic_batch(args.batch, args.size, len(cfg.seen), generator)
    text = F.normalize(torch.randn(len(cfg.class_names), model.embed_dim, generator=generator), dim=-1)
    seen_text = text[list(cfg.seen)]  # inductive training sees only the seen classes

    model.train()
    start = time.perf_counter()
    out = model(images, seen_text)
    losses = model.loss(out, labels)
    losses["loss"].backward()
    elapsed = time.perf_counter() - start
    print(f"images {tuple(images.shape)} -> mask_logits {tuple(out['mask_logits'].shape)}")
    print(
        f"loss {losses['loss'].item():.4f} = focal x100 {losses['loss_mask'].item():.4f} "
        f"+ dice {losses['loss_dice'].item():.4f}   (forward+backward {elapsed * 1000:.0f} ms)"
    )

    model.eval()
    big = torch.randn(1, 3, args.size + 40, args.size * 2 + 8, generator=generator)
    scores = model.segment(big, text)
    pred = scores.argmax(dim=1)
    print(f"segment {tuple(big.shape)} -> scores {tuple(scores.shape)}, label map {tuple(pred.shape)}, "
          f"{len(pred.unique())} classes present (random weights: noise)")


if __name__ == "__main__":
    main()
