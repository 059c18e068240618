"""The official implementation's formulation of the three head ops and the loss, as the eager baseline of every
benchmark.

These are written the way the official Cascade-CLIP code computes them (``MODEL_SPEC.md`` sections 3.1-3.3), not the
way our reference backend does: a Python sum over taps, a materialised ``[T * g, T]`` concatenation through one
``Linear`` per stage, and per-head attention logits averaged over heads, then summed over stages.

The ``*_stages`` functions take what the official head holds: every tap, every stage's q and k and every stage's
parameters as separate tensors, and they return per-stage outputs where the official code keeps them apart. The GPU
and CPU benchmarks time these. ``nga``, ``descriptor`` and ``mask_logits`` are the same computations on the stacked
inputs of the :mod:`cascade_clip.ops` API (slices of them, then a stack), which the tests compare both against.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F


def nga_stages(taps: Sequence[Sequence[torch.Tensor]], weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """taps[s][k] (B, N, D), weights[s] (K,) -> one (B, N, D) memory per stage: ``w[0]*F_a + w[1]*F_b + w[2]*F_c``.

    As the official head has them: every tap is its own tensor (a block's output) and every stage its own weight
    vector (``weights_s1``, ``weights_s2``), and the memories are used stage by stage, never stacked.
    """
    memories = []
    for stage_taps, w in zip(taps, weights):
        fused = w[0] * stage_taps[0]
        for k in range(1, len(stage_taps)):
            fused = fused + w[k] * stage_taps[k]
        memories.append(fused)
    return memories


def nga(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """feats (S, K, B, N, D), weights (S, K) -> (S, B, N, D): :func:`nga_stages` on slices of stacked inputs.

    Indexing stacked inputs is not what the official code does: each slice's backward allocates and zero-fills a
    gradient of the whole stacked tensor. The GPU benchmark therefore calls :func:`nga_stages` on separate tensors.
    """
    taps = [[feats[s, k] for k in range(feats.shape[1])] for s in range(feats.shape[0])]
    return torch.stack(nga_stages(taps, [weights[s] for s in range(weights.shape[0])]))


def descriptor_stages(text: torch.Tensor, g: torch.Tensor, weights: Sequence[torch.Tensor],
                      biases: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """text (C, d), g (B, d), weights[s] (e, 2d), biases[s] (e,) -> one (B, C, e) query tensor per stage.

    ``cat([T*g, T])`` built once and passed through each stage's own ``Linear`` (``q_projs[s]``), as officially.
    """
    num_images = g.shape[0]
    text = text.to(g.dtype)
    relation = torch.cat(
        [text.unsqueeze(0) * g.unsqueeze(1), text.unsqueeze(0).expand(num_images, -1, -1)], dim=-1
    )
    return [F.linear(relation, w, b) for w, b in zip(weights, biases)]


def descriptor(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """text (C, d), g (B, d), weight (S, e, 2d), bias (S, e) -> (S, B, C, e): :func:`descriptor_stages` on stacked
    per-stage parameters."""
    stages = range(weight.shape[0])
    return torch.stack(descriptor_stages(text, g, [weight[s] for s in stages], [bias[s] for s in stages]))


def mask_logits_stages(qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], heads: int,
                       normalize: bool = False) -> torch.Tensor:
    """qs[s] (B, C, d), ks[s] (B, N, d) -> (B, C, N): per-head ``q_h k_h^T / sqrt(d_h)``, mean over heads, summed
    over the stages, each stage's q and k being its own decoder's tensors.

    With ``normalize`` the inputs are L2-normalised first (cosine logits; then use ``heads=1`` for plain cosine).
    """
    total = None
    for q, k in zip(qs, ks):
        if normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        batch, num_classes, dim = q.shape
        head_dim = dim // heads
        qh = q.reshape(batch, num_classes, heads, head_dim).transpose(1, 2)  # (B, h, C, dh)
        kh = k.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, N, dh)
        per_head = qh @ kh.transpose(-2, -1) * head_dim**-0.5  # (B, h, C, N), materialised as officially
        stage = per_head.mean(dim=1)
        total = stage if total is None else total + stage
    return total


def mask_logits(q: torch.Tensor, k: torch.Tensor, heads: int, normalize: bool = False) -> torch.Tensor:
    """q (S, B, C, d), k (S, B, N, d) -> (B, C, N): :func:`mask_logits_stages` on slices of stacked inputs.

    Equals ``ops.mask_logits(q, k, scale=(d // heads) ** -0.5 / heads, normalize=normalize)``.
    """
    stages = range(q.shape[0])
    return mask_logits_stages([q[s] for s in stages], [k[s] for s in stages], heads, normalize)


def split_stacked(op: str, stacked: Sequence[torch.Tensor], requires_grad: bool) -> List[torch.Tensor]:
    """The stacked ``cascade_clip.ops`` inputs of ``op`` as the official head holds them, flat, as separate leaf
    tensors with the same values: nga: the S*K taps (stage-major), then each stage's (K,) weights; descriptor: text,
    g, each stage's weight, then each stage's bias; mask_logits: each stage's q, then each stage's k."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(requires_grad)

    if op == "nga":
        feats, weights = stacked
        return [leaf(tap) for stage in feats for tap in stage] + [leaf(w) for w in weights]
    if op == "descriptor":
        text, g, weight, bias = stacked
        return [leaf(text), leaf(g)] + [leaf(w) for w in weight] + [leaf(b) for b in bias]
    if op == "mask_logits":
        q, k = stacked
        return [leaf(t) for t in q] + [leaf(t) for t in k]
    raise ValueError(f"unknown op {op!r}")


def flat_stages_fn(op: str, stages: int, taps: int = 3, heads: int = 1, normalize: bool = False):
    """The official formulation of ``op`` over :func:`split_stacked`'s flat arguments (plain tensor arguments, as
    timing loops and ``torch.compile`` want them), returning a list: one output per stage for nga and the descriptor,
    the stage-summed logits for mask_logits."""
    if op == "nga":
        def nga(*xs):
            return nga_stages([xs[s * taps:(s + 1) * taps] for s in range(stages)], xs[stages * taps:])
        return nga
    if op == "descriptor":
        def descriptor(text, g, *params):
            return descriptor_stages(text, g, params[:stages], params[stages:])
        return descriptor
    if op == "mask_logits":
        def mask_logits(*xs):
            return [mask_logits_stages(xs[:stages], xs[stages:], heads, normalize)]
        return mask_logits
    raise ValueError(f"unknown op {op!r}")


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, focal_weight: float = 100.0, dice_weight: float = 1.0):
    """logits (B, C, H, W), labels (B, H, W) in [0, C) or 255 -> the official focal (x100) + dice loss, a scalar.

    The element-wise formulation of ``SegPlusCriterion.loss_masks`` (MODEL_SPEC.md section 5) over the whole batch:
    float32 one-hot targets (255 = negative everywhere), sigmoid, BCE with logits, ``(1 - p_t)^2 * alpha_t``, each a
    (B, C, H, W) tensor. (The official code builds the targets image by image in a Python loop, slower still.)
    """
    x = logits.float()
    ignored = labels == 255
    target = F.one_hot(labels.masked_fill(ignored, 0), x.shape[1]).permute(0, 3, 1, 2).to(x.dtype)
    target = target.masked_fill(ignored.unsqueeze(1), 0.0)
    present = target.flatten(2).amax(dim=2) > 0
    num_masks = present.sum().to(x.dtype).clamp(min=1.0)
    prob = x.sigmoid()
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    loss_mask = (bce * (1 - p_t) ** 2 * alpha_t).flatten(2).mean(dim=2).sum() / num_masks
    overlap = (prob * target).flatten(2).sum(dim=2)
    dice = 1 - (2 * overlap + 1) / (prob.flatten(2).sum(dim=2) + target.flatten(2).sum(dim=2) + 1)
    loss_dice = (dice * present).sum() / num_masks
    return focal_weight * loss_mask + dice_weight * loss_dice
