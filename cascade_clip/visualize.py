"""Colours and pictures of a label map: class palette, palette PNG of class indices, overlay with a legend.

Palette: a class that belongs to a shipped dataset keeps that dataset's colour (when every name comes from one dataset,
so "cat,dog" is coloured as in VOC); otherwise colours are generated, evenly spread in hue with varied brightness.
"""

from __future__ import annotations

import colorsys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .catalog import DATASET_NAMES, dataset_info

Color = Tuple[int, int, int]


def generated_palette(count: int) -> list:
    """``count`` distinct RGB colours: golden-ratio hue steps, alternating value/saturation bands."""
    colours = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0
        value = (0.95, 0.75, 0.55)[i % 3]
        saturation = (0.85, 0.6)[(i // 3) % 2]
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def class_palette(names: Sequence[str]) -> list:
    """One RGB colour per class name (see the module docstring)."""
    for dataset in DATASET_NAMES:
        info = dataset_info(dataset)
        colour_of = dict(zip(info.classes, info.palette))
        if all(name in colour_of for name in names):
            return [tuple(int(c) for c in colour_of[name]) for name in names]
    return generated_palette(len(names))


def label_image(labels: np.ndarray, palette: Sequence[Color]) -> Image.Image:
    """(H, W) class indices -> a PIL image whose pixel values are the indices.

    Up to 256 classes: a palette ("P") PNG, viewable in colour and readable back as indices. More classes do not fit
    8 bits, so the indices are stored as 16-bit grayscale ("I;16") instead.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if len(palette) <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        flat = [c for colour in palette for c in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
        return image
    return Image.fromarray(labels.astype(np.uint16))


def format_fraction(fraction: float) -> str:
    """A share of the image as a percentage; tiny non-zero shares read "<0.1%" rather than a misleading "0.0%"."""
    return "<0.1%" if 0 < fraction < 0.0005 else f"{100 * fraction:.1f}%"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def overlay_image(
    rgb: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    palette: Sequence[Color],
    *,
    alpha: float = 0.5,
    areas: Optional[Dict[int, float]] = None,
) -> Image.Image:
    """The image blended with its colour mask, with a legend panel (classes present, largest first) on the right.

    rgb (H, W, 3) uint8; labels (H, W) indices into ``names``/``palette``; ``areas`` index -> fraction of pixels
    (computed when not given). The legend sits beside the image, not on it, so tiny images stay legible.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    labels = np.asarray(labels)
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blended = (rgb.astype(np.float32) * (1.0 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)
    height, width = labels.shape
    if areas is None:
        counts = np.bincount(labels.ravel(), minlength=len(names))
        areas = {int(i): float(c) / labels.size for i, c in enumerate(counts) if c}
    present = sorted(areas, key=lambda i: -areas[i])

    font_size = int(min(max(12, height // 30), 28))
    font = _font(font_size)
    row = font_size + 6
    swatch = font_size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [f"{names[i]}  {format_fraction(areas[i])}" for i in present]
    text_width = max((measure.textlength(line, font=font) for line in lines), default=0)
    panel_width = int(swatch + 18 + text_width + 8)
    panel_height = 8 + row * len(lines)

    canvas = Image.new("RGB", (width + panel_width, max(height, panel_height)), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (index, line) in enumerate(zip(present, lines)):
        top = 6 + k * row
        left = width + 8
        draw.rectangle([left, top, left + swatch, top + swatch], fill=tuple(palette[index]), outline=(0, 0, 0))
        draw.text((left + swatch + 8, top), line, fill=(0, 0, 0), font=font)
    return canvas
