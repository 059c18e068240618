"""The official training loss: sigmoid focal (x100) + dice (x1) over per-class masks (MODEL_SPEC.md section 5).

Official behaviour, reproduced by default: ignore (255) pixels are negatives for every class in the focal term and
their predicted mass enters the dice denominators; the focal term sums over every class channel, present or not,
and both terms are divided by the number of (image, present class) pairs, all-reduced over DDP ranks.
``ignore_pixels=True`` is a documented deviation that drops 255 pixels from both terms.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ops
from .catalog import IGNORE_INDEX


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless labels (B, H, W) are integers in [0, num_classes) or 255."""
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor (B, H, W), got {labels.dtype} {tuple(labels.shape)}")
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid])[:10].tolist()
        raise ValueError(f"labels must be in [0, {num_classes}) or {IGNORE_INDEX}; found {bad}")


def _num_masks(present_pairs: torch.Tensor) -> torch.Tensor:
    """Number of (image, present class) pairs, averaged over DDP ranks and clamped to >= 1 (official)."""
    count = present_pairs.to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def loss_terms(
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_pixels: bool = False,
    backend: Optional[str] = None,
    validate_labels: bool = True,
) -> Dict[str, torch.Tensor]:
    """The official loss before its normalisation by the number of masks.

    mask_logits (B, C, H', W') pre-sigmoid, labels (B, H, W) in [0, C) or 255 -> ``focal``: the pixel-mean focal term
    summed over images and classes, ``dice``: the dice loss summed over the present (image, class) pairs, ``masks``:
    the number of those pairs on this process (float32). The official loss is ``(w_f * focal + w_d * dice) / n`` with
    ``n`` the mask count averaged over DDP ranks, clamped to >= 1 (:func:`segmentation_loss`); a gradient-accumulating
    loop normalises the terms of all its micro-batches by their joint count instead (:mod:`cascade_clip.accumulation`).
    """
    num_classes = mask_logits.shape[1]
    if validate_labels:
        check_labels(labels, num_classes)
    if mask_logits.shape[-2:] != labels.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    # per (image, class): sums over pixels of the focal term, p, p * t and t (one fused pass on the triton and cpp
    # backends; the reference backend is the official element-wise formulation)
    sums = ops.loss_sums(mask_logits, labels, ignore_pixels=ignore_pixels, backend=backend)
    focal_sum, p_sum, pt_sum, t_sum = sums.unbind(dim=-1)
    present = t_sum > 0  # (B, C): the classes present in each image
    pixels = labels.shape[-2] * labels.shape[-1]
    dice = 1 - (2 * pt_sum + 1) / (p_sum + t_sum + 1)  # (B, C)
    return {"focal": focal_sum.sum() / pixels, "dice": (dice * present).sum(), "masks": present.sum().to(torch.float32)}


def normalized_loss(
    terms: Dict[str, torch.Tensor], num_masks: torch.Tensor, *, focal_weight: float = 100.0, dice_weight: float = 1.0
) -> Dict[str, torch.Tensor]:
    """``loss_mask`` (focal, weighted), ``loss_dice`` (weighted) and their sum ``loss``: :func:`loss_terms`' sums over
    ``num_masks``."""
    loss_mask = focal_weight * (terms["focal"] / num_masks)
    loss_dice = dice_weight * (terms["dice"] / num_masks)
    return {"loss_mask": loss_mask, "loss_dice": loss_dice, "loss": loss_mask + loss_dice}


def segmentation_loss(
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    ignore_pixels: bool = False,
    backend: Optional[str] = None,
    validate_labels: bool = True,
) -> Dict[str, torch.Tensor]:
    """mask_logits (B, C, H', W') pre-sigmoid, labels (B, H, W) in [0, C) or 255 -> loss dict.

    Returns ``loss_mask`` (focal, weighted), ``loss_dice`` (weighted) and their sum ``loss``. ``backend``: the
    :mod:`cascade_clip.ops` backend of the pixel sums (default: the process default, as for the head's ops).
    ``validate_labels``: check the label values first (a clear error instead of a silently wrong loss); the check
    waits for the GPU, so a caller whose labels are known to be valid (or a CUDA-graph capture) may turn it off.
    """
    terms = loss_terms(mask_logits, labels, ignore_pixels=ignore_pixels, backend=backend,
                       validate_labels=validate_labels)
    return normalized_loss(terms, _num_masks(terms["masks"]), focal_weight=focal_weight, dice_weight=dice_weight)
