"""Sliding-window zero-shot inference (official ``slide_inference`` with the head's eval-mode calibration).

Per window: ``sigmoid(mask_logits)``, minus ``calibration`` on the seen classes; the calibrated scores of overlapping
windows are averaged per pixel (MODEL_SPEC.md sections 3.5 and 4).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F


def check_windows(crop: int, stride: int) -> None:
    """Raise ValueError unless ``0 < stride <= crop``: a stride past the crop leaves pixels that no window covers
    (the official code asserts every pixel is counted)."""
    if crop <= 0 or not 0 < stride <= crop:
        raise ValueError(f"sliding windows need 0 < stride <= crop, got crop {crop}, stride {stride}")


def window_starts(size: int, crop: int, stride: int) -> list:
    """Official window placement along one axis: (start, end) pairs, the last window flush with the border."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def calibrated_scores(mask_logits: torch.Tensor, seen: Sequence[int], calibration: float) -> torch.Tensor:
    """(B, C, H, W) logits -> sigmoid scores with ``calibration`` subtracted on the ``seen`` channels."""
    scores = torch.sigmoid(mask_logits.float())
    if calibration and len(seen):
        # one broadcast subtraction of a per-channel shift over the channels from the first to the last seen one (0
        # off the seen channels: x - 0 is x, so the values are those of subtracting on the seen channels alone)
        # instead of gathering and scattering the seen channels, which for COCO-Stuff's 156 seen of 171 classes
        # copied most of the scores twice
        classes = scores.shape[1]
        index = torch.as_tensor([int(i) for i in seen], dtype=torch.long)  # a list, a range, an array, a tensor
        if bool(((index < -classes) | (index >= classes)).any()):
            raise IndexError(f"seen class indices {index.tolist()} out of range for {classes} classes")
        index = torch.where(index < 0, index + classes, index)  # negative indices count from the end, as in indexing
        lo, hi = int(index.min()), int(index.max()) + 1
        shift = torch.zeros(hi - lo, dtype=scores.dtype)
        shift[index - lo] = calibration
        scores[:, lo:hi].sub_(shift.to(scores.device).view(1, -1, 1, 1))
    return scores


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, 3, H, W) at the bottom/right so H and W are multiples of ``multiple``."""
    pad_h = (-images.shape[-2]) % multiple
    pad_w = (-images.shape[-1]) % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    return images


def slide_inference(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    num_classes: int,
    crop: int,
    stride: int,
    patch: int,
    seen: Sequence[int],
    calibration: float,
    window_batch: int = 4,
) -> torch.Tensor:
    """Average of calibrated window scores over (B, 3, H, W) -> (B, C, H, W) float32.

    ``logits_fn`` maps a window (B, 3, h, w) whose sides are multiples of ``patch`` to mask logits (B, C, h, w).
    Windows smaller than the crop (images smaller than it) are zero-padded to the patch multiple and cropped back.

    All windows of an image have the same size (``crop``, or the image side where it is smaller), so up to
    ``window_batch`` of them go through ``logits_fn`` as one batch: the same per-window results (the images of a batch
    are independent) with a fraction of the forward calls, which dominate on a GPU at one image per call. Scores are
    accumulated window by window in the official order.
    """
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    check_windows(crop, stride)
    batch, _, height, width = images.shape
    total = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    windows = [(y1, y2, x1, x2) for y1, y2 in window_starts(height, crop, stride)
               for x1, x2 in window_starts(width, crop, stride)]
    for first in range(0, len(windows), window_batch):
        group = windows[first : first + window_batch]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])  # (len(group) * B, 3, h, w)
        y1, y2, x1, x2 = group[0]
        logits = logits_fn(pad_to_multiple(crops, patch))[:, :, : y2 - y1, : x2 - x1]
        scores = calibrated_scores(logits, seen, calibration)
        for i, (y1, y2, x1, x2) in enumerate(group):
            total[:, :, y1:y2, x1:x2] += scores[i * batch : (i + 1) * batch]
            count[:, :, y1:y2, x1:x2] += 1
    return total.div_(count)  # in place: no second (B, C, H, W) buffer


def official_test_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """``(h, w)`` of the official test resize: mmseg 0.24 ``Resize(keep_ratio=True, min_size=short_side)`` sets the
    target scale to the short side and the proportional long side, then ``mmcv.imrescale`` applies
    ``min(long / max(H, W), short / min(H, W))`` and rounds half up (``int(x + 0.5)``), computed here the same way."""
    if height > width:
        target = (short_side * height / width, short_side)
    else:
        target = (short_side, short_side * width / height)
    factor = min(max(target) / max(height, width), min(target) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_short_side(images: torch.Tensor, short_side: int) -> torch.Tensor:
    """Official test scale: (B, 3, H, W) resized to :func:`official_test_size` (short side ``short_side``, aspect kept;
    bilinear, no antialias).

    mmseg resizes the uint8 image with OpenCV; bilinear resampling here differs from it by interpolation rounding only.
    """
    height, width = images.shape[-2:]
    size = official_test_size(height, width, short_side)
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def scores_at_original_size(scores: torch.Tensor, size) -> torch.Tensor:
    """Resize per-class scores (B, C, h, w) to the original image size (bilinear, align_corners=False)."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
