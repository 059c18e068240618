"""Segmentation datasets in the mmseg directory layouts of the official code (``datasets.json`` ``layout``).

* ``voc``: ``VOCdevkit/VOC2012``, ``JPEGImages/*.jpg``, palette PNGs in ``SegmentationClass`` (split
  ``ImageSets/Segmentation/{train,val}.txt``); split ``train+aug`` adds ``aug.txt`` with masks in
  ``SegmentationClassAug`` (the official VOC training set).
* ``context``: ``VOCdevkit/VOC2010``, ``SegmentationClassContext``, ``ImageSets/SegmentationContext/{train,val}.txt``.
* ``coco``: ``coco_stuff164k``, ``images/{train2017,val2017}/*.jpg`` with ``annotations/.../*_labelTrainIds.png``;
  a split is every image in the folder.

``root`` may be the folder holding the layout root (``data/`` with ``data/VOCdevkit/VOC2012``) or the layout root
itself. Masks are read as class indices (a palette PNG's indices, never its colours). VOC and Context use
``reduce_zero_label`` (0 = background -> 255, k -> k-1). Every sample is checked: its mask exists (at construction),
has the image's size and only values in [0, num_classes) or 255 (when read).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .catalog import IGNORE_INDEX
from .image_io import read_rgb


@dataclass(frozen=True)
class Layout:
    """Where one dataset keeps its files, relative to its root."""

    root: str  # layout root under the data folder
    img_suffix: str
    seg_suffix: str
    reduce_zero_label: bool
    # split name -> list of (split file or None for "every image in img_dir", img_dir, ann_dir)
    splits: Dict[str, Tuple[Tuple[Optional[str], str, str], ...]]


LAYOUTS: Dict[str, Layout] = {
    "voc": Layout(
        root="VOCdevkit/VOC2012",
        img_suffix=".jpg",
        seg_suffix=".png",
        reduce_zero_label=True,
        splits={
            "train": (("ImageSets/Segmentation/train.txt", "JPEGImages", "SegmentationClass"),),
            "aug": (("ImageSets/Segmentation/aug.txt", "JPEGImages", "SegmentationClassAug"),),
            "train+aug": (
                ("ImageSets/Segmentation/train.txt", "JPEGImages", "SegmentationClass"),
                ("ImageSets/Segmentation/aug.txt", "JPEGImages", "SegmentationClassAug"),
            ),
            "val": (("ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass"),),
        },
    ),
    "context": Layout(
        root="VOCdevkit/VOC2010",
        img_suffix=".jpg",
        seg_suffix=".png",
        reduce_zero_label=True,
        splits={
            "train": (("ImageSets/SegmentationContext/train.txt", "JPEGImages", "SegmentationClassContext"),),
            "val": (("ImageSets/SegmentationContext/val.txt", "JPEGImages", "SegmentationClassContext"),),
        },
    ),
    "coco": Layout(
        root="coco_stuff164k",
        img_suffix=".jpg",
        seg_suffix="_labelTrainIds.png",
        reduce_zero_label=False,
        splits={
            "train": ((None, "images/train2017", "annotations/train2017"),),
            "val": ((None, "images/val2017", "annotations/val2017"),),
        },
    ),
}


@dataclass(frozen=True)
class Sample:
    name: str  # image file name without suffix (prediction files are named after it)
    image: str
    mask: str


def layout(dataset: str) -> Layout:
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {dataset!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[dataset]


def resolve_root(dataset: str, root: str) -> str:
    """The layout root of ``dataset`` given the data folder or the layout root itself."""
    if not root:
        raise ValueError(f"no data root given for dataset {dataset!r} (use --data-root)")
    if not os.path.isdir(root):
        raise ValueError(f"data root not found: {root}")
    nested = os.path.join(root, layout(dataset).root)
    if os.path.isdir(nested):
        return nested
    return root


def _read_split_file(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise ValueError(f"split file not found: {path}")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"split file is empty: {path}")
    return names


def list_samples(dataset: str, root: str, split: str) -> List[Sample]:
    """The (image, mask) pairs of ``split``; raises ValueError for a missing root, split file, folder or mask."""
    spec = layout(dataset)
    if split not in spec.splits:
        raise ValueError(f"unknown split {split!r} for {dataset}; known: {sorted(spec.splits)}")
    base = resolve_root(dataset, root)
    samples: List[Sample] = []
    for split_file, img_dir, ann_dir in spec.splits[split]:
        img_path = os.path.join(base, img_dir)
        if not os.path.isdir(img_path):
            raise ValueError(f"image folder not found: {img_path} (is --data-root the {dataset} data folder?)")
        if split_file is None:
            names = sorted(f[: -len(spec.img_suffix)] for f in os.listdir(img_path) if f.endswith(spec.img_suffix))
            if not names:
                raise ValueError(f"no *{spec.img_suffix} images in {img_path}")
        else:
            try:
                names = _read_split_file(os.path.join(base, split_file))
            except ValueError as exc:
                if dataset == "voc" and split == "train+aug" and "Aug" in ann_dir:
                    raise ValueError(f"{exc} (the SegmentationClassAug split; without it, train on VOC's own train split "
                                     "with --set data.train_split=train)") from exc
                raise
        for name in names:
            image = os.path.join(img_path, name + spec.img_suffix)
            mask = os.path.join(base, ann_dir, name + spec.seg_suffix)
            if not os.path.isfile(image):
                raise ValueError(f"image not found: {image} (listed in the {split} split)")
            if not os.path.isfile(mask):
                raise ValueError(f"image {image} has no mask: {mask} not found")
            samples.append(Sample(name, image, mask))
    return samples


def read_mask(path: str) -> np.ndarray:
    """A label PNG as (H, W) uint8 class indices: palette indices for 'P' images, values for grayscale ones (1-bit
    masks as 0/1, as mmseg's Pillow decoding gives them)."""
    try:
        with Image.open(path) as mask:
            mode = mask.mode
            if mode in ("P", "L", "1"):
                array = np.asarray(mask, dtype=np.uint8).copy()
            elif mode in ("I", "I;16", "I;16B", "I;16L"):
                array = np.asarray(mask).astype(np.int64)
                if array.size and (array.min() < 0 or array.max() > 255):
                    raise ValueError(f"{path}: mask values must be 0..255, got range [{array.min()}, {array.max()}]")
                array = array.astype(np.uint8)
            else:
                raise ValueError(
                    f"{path}: a mask must be a palette ('P') or grayscale PNG of class indices, got mode {mode!r}"
                )
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read as a mask image ({type(exc).__name__}: {exc})") from exc
    return array


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (background) -> 255, k -> k-1, 255 stays 255."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, fixed by (seed, epoch, index): data do not depend on the number
    of loader workers, ranks, or where a resumed run starts."""
    digest = hashlib.sha256(f"{base_seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples as dicts ``{"image", "label", "name", "index"}``.

    Without a transform: image (3, H, W) uint8 RGB, label (H, W) int64 in [0, num_classes) or 255. A transform
    ``transform(image, label, generator)`` gets the same uint8 tensors and a ``torch.Generator`` seeded per sample.
    Indexing with ``(index, seed)`` (what :class:`cascade_clip.sampler.ResumableSampler` yields) seeds that generator.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        num_classes: int,
        reduce_zero_label: bool,
        transform: Optional[Callable] = None,
    ):
        if not samples:
            raise ValueError("the dataset has no samples")
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB and (H, W) uint8 labels of sample ``index``, validated."""
        sample = self.samples[index]
        rgb = read_rgb(sample.image)
        label = read_mask(sample.mask)
        if label.shape != rgb.shape[:2]:
            raise ValueError(
                f"{sample.mask}: mask size {label.shape[1]}x{label.shape[0]} (WxH) differs from its image "
                f"{sample.image} ({rgb.shape[1]}x{rgb.shape[0]})"
            )
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
        if bad.size:
            raw = (bad + 1).tolist() if self.reduce_zero_label else bad.tolist()
            raise ValueError(
                f"{sample.mask}: mask values {raw} are outside the dataset's {self.num_classes} classes and "
                f"{IGNORE_INDEX} (ignore)"
            )
        return rgb, label

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict:
        index, seed = (key if isinstance(key, tuple) else (key, None))
        rgb, label = self.read(index)
        image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        target = torch.from_numpy(label)
        if self.transform is not None:
            generator = torch.Generator().manual_seed(seed if seed is not None else sample_seed(0, 0, index))
            image, target = self.transform(image, target, generator)
        return {"image": image, "label": target.long(), "name": self.samples[index].name, "index": index}


def build_dataset(
    dataset: str, root: str, split: str, *, num_classes: int, transform: Optional[Callable] = None
) -> SegmentationDataset:
    """The dataset ``dataset`` (layout name) at ``root``, split ``split``, checked against ``num_classes``."""
    spec = layout(dataset)
    return SegmentationDataset(
        list_samples(dataset, root, split),
        num_classes=num_classes,
        reduce_zero_label=spec.reduce_zero_label,
        transform=transform,
    )
