"""The official implementation's formulation of the three head ops and the loss, as the eager baseline of every
benchmark.

These are written the way the official Cascade-CLIP code computes them (``MODEL_SPEC.md`` sections 3.1-3.3), not the
way our reference backend does: a Python sum over taps, a materialised ``[T * g, T]`` concatenation through one
``Linear`` per stage, and per-head attention logits averaged over heads, then summed over stages. The shapes follow
the :mod:`cascade_clip.ops` API so that every provider is called on the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nga(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """feats (S, K, B, N, D), weights (S, K) -> (S, B, N, D): ``w[0]*F_a + w[1]*F_b + w[2]*F_c`` per stage."""
    stages = []
    for s in range(feats.shape[0]):
        fused = weights[s, 0] * feats[s, 0]
        for k in range(1, feats.shape[1]):
            fused = fused + weights[s, k] * feats[s, k]
        stages.append(fused)
    return torch.stack(stages)


def descriptor(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """text (C, d), g (B, d), weight (S, e, 2d), bias (S, e) -> (S, B, C, e) via ``cat([T*g, T])`` and Linear."""
    num_images = g.shape[0]
    text = text.to(g.dtype)
    relation = torch.cat(
        [text.unsqueeze(0) * g.unsqueeze(1), text.unsqueeze(0).expand(num_images, -1, -1)], dim=-1
    )
    return torch.stack([F.linear(relation, weight[s], bias[s]) for s in range(weight.shape[0])])


def mask_logits(q: torch.Tensor, k: torch.Tensor, heads: int, normalize: bool = False) -> torch.Tensor:
    """q (S, B, C, d), k (S, B, N, d) -> (B, C, N): per-head ``q_h k_h^T / sqrt(d_h)``, mean over heads, sum over S.

    With ``normalize`` the inputs are L2-normalised first (cosine logits; then use ``heads=1`` for plain cosine).
    Equals ``ops.mask_logits(q, k, scale=(d // heads) ** -0.5 / heads, normalize=normalize)``.
    """
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    num_stages, batch, num_classes, dim = q.shape
    head_dim = dim // heads
    total = None
    for s in range(num_stages):
        qh = q[s].reshape(batch, num_classes, heads, head_dim).transpose(1, 2)  # (B, h, C, dh)
        kh = k[s].reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, N, dh)
        per_head = qh @ kh.transpose(-2, -1) * head_dim**-0.5  # (B, h, C, N), materialised as officially
        stage = per_head.mean(dim=1)
        total = stage if total is None else total + stage
    return total


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
