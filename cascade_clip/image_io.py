"""Reading images and turning them into normalised model input."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .catalog import image_norm


def read_rgb(path: str, upright: bool = False) -> np.ndarray:
    """Image at ``path`` as (H, W, 3) uint8 RGB (grayscale, palette and RGBA are converted; alpha dropped).

    ``upright``: apply the EXIF orientation tag (a phone photo stored sideways comes out as it is displayed). Off for
    dataset images, whose label masks are aligned with the stored pixels.
    """
    try:
        with Image.open(path) as image:
            if upright:
                image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc


def normalize_rgb(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised with the official (ImageNet) mean and std."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in image_norm())
    return (torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() - mean) / std
