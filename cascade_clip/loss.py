"""The official training loss: sigmoid focal (x100) + dice (x1) over per-class masks (MODEL_SPEC.md section 5).

Official behaviour, reproduced by default: ignore (255) pixels are negatives for every class in the focal term and
their predicted mass enters the dice denominators; the focal term sums over every class channel, present or not,
and both terms are divided by the number of (image, present class) pairs, all-reduced over DDP ranks.
``ignore_pixels=True`` is a documented deviation that drops 255 pixels from both terms.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = 255


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless labels (B, H, W) are integers in [0, num_classes) or 255."""
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor (B, H, W), got {labels.dtype} {tuple(labels.shape)}")
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid])[:10].tolist()
        raise ValueError(f"labels must be in [0, {num_classes}) or {IGNORE_INDEX}; found {bad}")


def _num_masks(present: torch.Tensor) -> torch.Tensor:
    """Number of (image, present class) pairs, averaged over DDP ranks and clamped to >= 1 (official)."""
    count = present.sum().to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def segmentation_loss(
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_pixels: bool = False,
) -> Dict[str, torch.Tensor]:
    """mask_logits (B, C, H', W') pre-sigmoid, labels (B, H, W) in [0, C) or 255 -> loss dict.

    Returns ``loss_mask`` (focal, weighted), ``loss_dice`` (weighted) and their sum ``loss``.
    """
    num_classes = mask_logits.shape[1]
    check_labels(labels, num_classes)
    if mask_logits.shape[-2:] != labels.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    x = mask_logits.float()
    ignored = labels == IGNORE_INDEX
    # One-hot targets; ignored pixels get an all-zero row (negatives for every class, as officially).
    target = F.one_hot(labels.masked_fill(ignored, 0), num_classes).permute(0, 3, 1, 2).to(x.dtype)
    target = target.masked_fill(ignored.unsqueeze(1), 0.0)
    present = target.flatten(2).amax(dim=2) > 0  # (B, C)
    num_masks = _num_masks(present)

    prob = torch.sigmoid(x)
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = bce * (1 - p_t) ** 2 * alpha_t
    if ignore_pixels:
        keep = (~ignored).unsqueeze(1).to(x.dtype)
        focal = focal * keep
        prob = prob * keep
    pixels = labels.shape[-2] * labels.shape[-1]
    loss_mask = focal.sum() / pixels / num_masks

    p_sum = prob.flatten(2).sum(dim=2)
    t_sum = target.flatten(2).sum(dim=2)
    pt_sum = (prob * target).flatten(2).sum(dim=2)
    dice = 1 - (2 * pt_sum + 1) / (p_sum + t_sum + 1)  # (B, C)
    loss_dice = (dice * present).sum() / num_masks

    loss_mask = focal_weight * loss_mask
    loss_dice = dice_weight * loss_dice
    return {"loss_mask": loss_mask, "loss_dice": loss_dice, "loss": loss_mask + loss_dice}
