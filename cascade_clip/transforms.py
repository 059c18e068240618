"""Training and test pipelines equal to the official mmseg 0.24 ones (MODEL_SPEC.md section 6.7), on
``torchvision.transforms.v2`` functionals with ``tv_tensors.Image`` / ``tv_tensors.Mask`` (so resizing a mask is
nearest-neighbour and padding it uses the ignore value).

Training, in order: random rescale of ``scale`` (2048, 512) by a ratio in [0.5, 2.0] keeping the aspect ratio (bilinear
without antialiasing for the image, as OpenCV; nearest for the mask); a ``crop``-sized random crop re-drawn up to 10
times until no single labelled class covers >= ``cat_max_ratio`` of its labelled pixels; horizontal flip (p 0.5);
mmseg's PhotoMetricDistortion; normalisation (ImageNet mean/std on 0..255); padding to the crop (image 0, mask 255).

Randomness comes from a ``torch.Generator`` handed in per sample, so a sample's augmentation is fixed by its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from .catalog import IGNORE_INDEX, image_norm


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high) (numpy's randint convention, as mmseg uses)."""
    return int(torch.randint(low, high, (), generator=generator))


def rescale_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv ``imrescale``: the largest size with long side <= max(scale) and short side <= min(scale), aspect kept."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_rescale(image, mask, generator, scale: Tuple[int, int], ratio_range: Tuple[float, float]):
    ratio = _uniform(generator, *ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = list(rescale_size(image.shape[-2], image.shape[-1], target))
    image = TF.resize(image, size, antialias=False)  # bilinear like OpenCV's INTER_LINEAR (no antialiasing)
    mask = TF.resize(mask, size)  # tv_tensors.Mask -> nearest
    return image, mask


def _crop_box(height: int, width: int, crop: int, generator) -> Tuple[int, int]:
    top = _randint(generator, 0, max(height - crop, 0) + 1)
    left = _randint(generator, 0, max(width - crop, 0) + 1)
    return top, left


def random_crop(image, mask, generator, crop: int, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX):
    """mmseg RandomCrop: with cat_max_ratio < 1, up to 10 re-draws while one class dominates the labelled pixels
    (or fewer than two classes are present); the last draw is kept."""
    height, width = image.shape[-2:]
    top, left = _crop_box(height, width, crop, generator)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = mask[top : top + crop, left : left + crop]
            counts = torch.bincount(window.flatten().long(), minlength=256)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
                break
            top, left = _crop_box(height, width, crop, generator)
    h, w = min(crop, height), min(crop, width)
    return TF.crop(image, top, left, h, w), TF.crop(mask, top, left, h, w)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    # numpy's astype(uint8) after clipping truncates toward zero; float->uint8 in torch does the same.
    return x.clamp(0, 255).to(torch.uint8)


def photometric_distortion(
    image: torch.Tensor,
    generator: torch.Generator,
    brightness_delta: int = 32,
    contrast_range: Tuple[float, float] = (0.5, 1.5),
    saturation_range: Tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on a (3, H, W) uint8 RGB image; each step with probability 0.5.

    Brightness adds a delta and contrast multiplies (mmseg's definitions, not torchvision's blends). Saturation
    scales HSV saturation: with hue and value fixed a channel is V - (V - c) * S'/S, computed directly instead of
    through OpenCV's uint8 HSV round trip (differs by rounding). Hue shifts by an OpenCV hue delta in [-18, 18)
    (units of 2 degrees), i.e. ``adjust_hue`` by delta/180.
    """
    img = image
    if _randint(generator, 0, 2):
        img = _to_uint8(img.float() + _uniform(generator, -brightness_delta, brightness_delta))
    contrast_first = _randint(generator, 0, 2) == 1

    def contrast(x):
        if _randint(generator, 0, 2):
            x = _to_uint8(x.float() * _uniform(generator, *contrast_range))
        return x

    if contrast_first:
        img = contrast(img)
    if _randint(generator, 0, 2):
        alpha = _uniform(generator, *saturation_range)
        x = img.float()
        value = x.amax(dim=0, keepdim=True)
        spread = value - x.amin(dim=0, keepdim=True)
        # Saturation S = spread / V saturates at 1: the factor is capped at V / spread.
        factor = torch.where(spread > 0, torch.minimum(torch.full_like(spread, alpha), value / spread.clamp(min=1e-6)), 0.0)
        img = _to_uint8(value - (value - x) * factor)
    if _randint(generator, 0, 2):
        img = TF.adjust_hue(img, _randint(generator, -hue_delta, hue_delta) / 180.0)
    if not contrast_first:
        img = contrast(img)
    return img


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) 0..255 -> float32 normalised with the official ImageNet mean/std (on the 0..255 scale)."""
    mean, std = image_norm()
    return TF.normalize(image.float(), list(mean), list(std))


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: int):
    """Pad bottom/right to ``size`` x ``size``: image with 0 (after normalisation, as mmseg), mask with 255."""
    pad_h, pad_w = max(size - image.shape[-2], 0), max(size - image.shape[-1], 0)
    if pad_h or pad_w:
        image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
        mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
    return image, mask


@dataclass
class TrainTransform:
    """The official training pipeline; call with (image (3, H, W) uint8, label (H, W) uint8, generator)."""

    crop: int = 512
    scale: Tuple[int, int] = (2048, 512)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: Optional[torch.Generator] = None):
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        image = tv_tensors.Image(image)
        mask = tv_tensors.Mask(label.to(torch.uint8))
        image, mask = random_rescale(image, mask, generator, self.scale, self.ratio_range)
        image, mask = random_crop(image, mask, generator, self.crop, self.cat_max_ratio)
        if float(torch.rand((), generator=generator)) < self.flip_prob:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        if self.photometric:
            image = photometric_distortion(image.as_subclass(torch.Tensor), generator)
        image = normalize(image.as_subclass(torch.Tensor))
        image, mask = pad_to(tv_tensors.Image(image), mask, self.crop)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def eval_resize(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """Official test scale for a (B, 3, H, W) 0..255 float/uint8 batch: short side -> ``short_side`` (aspect kept),
    bilinear, rounded back to 0..255 integers as the uint8 image OpenCV returns; then normalised."""
    from .inference import resize_short_side

    resized = resize_short_side(image.float(), short_side).round().clamp(0, 255)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=image.device).view(1, 3, 1, 1) for v in image_norm())
    return (resized - mean) / std
