"""A procedural segmentation dataset written to disk in the VOC layout: no download, any size, reproducible.

Each image is a noisy background (label 0, "background", which ``reduce_zero_label`` turns into ignore, as in
VOC) with a few shapes (disks, rectangles, triangles). A class is a combination of two attributes, a shade and a hue,
as its name says ("dark red", "light green", ...): shapes are filled with that colour plus noise and a per-shape tint.
The unseen classes ("dark green", "light blue") combine attributes that seen classes carry ("dark red", "light
green", "light red", "dark blue"), so with class embeddings that are built from the same attributes, as
:func:`cascade_clip.quickstart.write_class_embeddings` builds them, what a model learns on the seen classes transfers to
the unseen ones: zero-shot segmentation in miniature. Masks are palette PNGs of class indices (1..K, 0 for
background) like VOC's ``SegmentationClass``. ``write_voc_layout(root)`` creates::

    root/VOCdevkit/VOC2012/JPEGImages/*.jpg
    root/VOCdevkit/VOC2012/SegmentationClass/*.png
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
    root/synthetic.json   (class names, seen/unseen split)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image

_HUES = {"red": (220, 50, 40), "green": (40, 170, 60), "blue": (50, 80, 220)}
# (shade, hue) per class; every attribute of the two unseen classes (the last two) is carried by a seen class
_CLASSES = (("dark", "red"), ("light", "green"), ("dark", "blue"), ("light", "red"), ("dark", "green"),
            ("light", "blue"))
CLASS_NAMES = tuple(f"{shade} {hue}" for shade, hue in _CLASSES)
SEEN = (0, 1, 2, 3)


def class_colour(index: int) -> Tuple[float, float, float]:
    """RGB fill of class ``index`` (classes past the sixth reuse the colours in turn): half the hue's value for
    "dark", the hue lifted toward white for "light" (the two shades 129-138 levels apart in every channel, far more
    than the fill's noise, 10, and per-shape tint, 20)."""
    shade, hue = _CLASSES[index % len(_CLASSES)]
    rgb = np.asarray(_HUES[hue], dtype=np.float32)
    return tuple(rgb * 0.5) if shade == "dark" else tuple(rgb * 0.45 + 140)


@dataclass
class SyntheticSpec:
    class_names: Tuple[str, ...] = CLASS_NAMES
    seen: Tuple[int, ...] = SEEN
    train_images: int = 48
    val_images: int = 12
    min_side: int = 64
    max_side: int = 112
    shapes: Tuple[int, int] = (2, 4)  # shapes per image, inclusive range
    seed: int = 0

    @property
    def unseen(self) -> Tuple[int, ...]:
        return tuple(i for i in range(len(self.class_names)) if i not in self.seen)


def voc_palette(count: int = 256) -> List[List[int]]:
    """The PASCAL VOC colour map (bit-interleaved), as VOC's palette PNGs use."""
    palette = []
    for index in range(count):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append([r, g, b])
    return palette


def _shape_mask(kind: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    size = rng.uniform(0.18, 0.4) * min(height, width)
    if kind == 0:
        return (y - cy) ** 2 + (x - cx) ** 2 <= size**2
    if kind == 1:
        ah, aw = size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.4)
        return (np.abs(y - cy) <= ah) & (np.abs(x - cx) <= aw)
    # triangle pointing up
    return (y - cy <= size) & (y - cy >= -size) & (np.abs(x - cx) <= (y - cy + size) / 2)


def draw_sample(spec: SyntheticSpec, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 VOC-style label (0 background, k+1 for class k)."""
    height, width = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    base = rng.uniform(90, 160, size=3)
    image = np.broadcast_to(base, (height, width, 3)) + rng.normal(0, 18, size=(height, width, 3))
    label = np.zeros((height, width), dtype=np.uint8)
    count = int(rng.integers(spec.shapes[0], spec.shapes[1] + 1))
    for _ in range(count):
        cls = int(rng.integers(len(spec.class_names)))
        mask = _shape_mask(int(rng.integers(3)), height, width, rng)
        fill = np.asarray(class_colour(cls), dtype=np.float32) + rng.normal(0, 10, size=(height, width, 3))
        fill += rng.uniform(-20, 20, size=3)  # per-instance tint
        image[mask] = fill[mask]
        label[mask] = cls + 1
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_voc_layout(root: str, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Write the dataset under ``root`` (VOC layout); returns the layout root. Idempotent for the same spec."""
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    info_path = os.path.join(root, "synthetic.json")
    info = {**asdict(spec), "unseen": list(spec.unseen)}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            if json.load(f) == json.loads(json.dumps(info)):
                return base
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    palette = [c for rgb in voc_palette() for c in rgb]
    splits = {"train": spec.train_images, "val": spec.val_images}
    for split, count in splits.items():
        names = []
        for i in range(count):
            name = f"{split}_{i:05d}"
            image, label = draw_sample(spec, rng)
            Image.fromarray(image).save(os.path.join(base, "JPEGImages", name + ".jpg"), quality=95)
            mask = Image.fromarray(label, mode="P")
            mask.putpalette(palette)
            mask.save(os.path.join(base, "SegmentationClass", name + ".png"))
            names.append(name)
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(names) + "\n")
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return base
