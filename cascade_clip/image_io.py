"""Reading images and turning them into normalised model input."""

from __future__ import annotations


import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_write
from .catalog import image_norm


# PIL's convert("RGB") clips 16-bit grayscale (modes I;16*) and 32-bit integer data (mode I) above 255 to white and
# rounds float data (mode F) in 0..1 to black: such images are scaled here instead.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray_scale(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """The 0..255 factor for a single-channel image of PIL ``mode``: 16-bit modes 255/65535; mode I 1 when its values
    fit 0..255, else 255/65535 (16-bit data, as PNG and TIFF readers hand it over); mode F 255 for 0..1 (the float
    image convention) and 1 for 0..255 (PIL's own)."""
    low, high = float(values.min()), float(values.max())
    if mode in _SIXTEEN_BIT_MODES:
        return 255.0 / 65535.0
    if mode == "I" and low >= 0 and high <= 65535:
        return 1.0 if high <= 255 else 255.0 / 65535.0
    if mode == "F" and np.isfinite(values).all() and low >= 0 and high <= 255:
        return 255.0 if high <= 1 else 1.0
    raise ValueError(f"{name}: a mode {mode} image must hold values in 0..255 or 0..65535 (I), or 0..1 or 0..255 (F); "
                     f"got [{low:.9g}, {high:.9g}]")


def pil_to_rgb(image: Image.Image, name: str = "image") -> np.ndarray:
    """A PIL image in any mode -> (H, W, 3) uint8 RGB: 16-bit, 32-bit integer and float grayscale scaled to 0..255 (see
    :func:`_gray_scale`); the other modes through PIL's conversion (grayscale repeated, palette expanded, alpha dropped,
    CMYK converted)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image)
        gray = np.round(values.astype(np.float64) * _gray_scale(values, image.mode, name))
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_rgb(path: str, upright: bool = False) -> np.ndarray:
    """Image at ``path`` as (H, W, 3) uint8 RGB (see :func:`pil_to_rgb` for the modes).

    ``upright``: apply the EXIF orientation tag (a phone photo stored sideways comes out as it is displayed). Off for
    dataset images, whose label masks are aligned with the stored pixels.
    """
    try:
        with Image.open(path) as image:
            if upright:
                image = ImageOps.exif_transpose(image)
            return pil_to_rgb(image, path)
    except Image.DecompressionBombError as exc:  # not an OSError: it would stop a whole batch
        raise ValueError(f"{path}: larger than PIL's safety limit of {Image.MAX_IMAGE_PIXELS} pixels ({exc}); "
                         "resize it first") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc


def normalize_rgb(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised with the official (ImageNet) mean and std."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in image_norm())
    return (torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() - mean) / std


def save_png_atomic(image: Image.Image, path: str) -> None:
    """Write ``image`` as a PNG at ``path`` through a temporary file and a rename: never half an image (a full disk
    or an interrupted run leaves the previous file, or none)."""
    with atomic_write(path) as f:
        image.save(f, format="PNG")
