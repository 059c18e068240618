"""Dataset facts shipped with the package: class lists, palettes, seen/unseen splits, prompt templates, normalisation.

``data/datasets.json`` is a copy of the project's reference ``datasets.json`` (the class lists and splits of the
official configs), so a user's clone needs nothing outside the package.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

_DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "datasets.json")

DATASET_NAMES = ("voc", "context", "coco")

# The ignore label of every dataset (mmseg's ignore_index): masks, crops' padding, the loss and the metrics skip it.
IGNORE_INDEX = 255


@functools.lru_cache(maxsize=1)
def _raw() -> Dict:
    with open(_DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the pipeline need to know about one dataset."""

    name: str
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    seen: Tuple[int, ...]  # indices into ``classes`` used in inductive training
    unseen: Tuple[int, ...]
    num_prompt_tokens: int  # VPT tokens of the official config (10 / 35 / 50)
    inductive_iters: int
    transductive_iters: int
    layout: Dict


def dataset_info(name: str) -> DatasetInfo:
    """Facts of dataset ``name`` (``"voc"``, ``"context"`` or ``"coco"``)."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASET_NAMES)}")
    d = _raw()[name]
    return DatasetInfo(
        name=name,
        classes=tuple(d["classes"]),
        palette=tuple(tuple(c) for c in d["palette"]),
        seen=tuple(d["seen"]),
        unseen=tuple(d["unseen"]),
        num_prompt_tokens=int(d["num_prompt_tokens"]),
        inductive_iters=int(d["inductive_iters"]),
        transductive_iters=int(d["transductive_iters"]),
        layout=dict(d["layout"]),
    )


def prompt_templates(kind: str = "single") -> List[str]:
    """The official text prompt templates: ``"single"`` (``a photo of a {}``) or ``"multi"`` (15 templates)."""
    templates = _raw()["prompt_templates"]
    if kind not in ("single", "multi"):
        raise ValueError(f"prompt template set must be 'single' or 'multi', got {kind!r}")
    return list(templates[kind])


def image_norm() -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) on 0..255 RGB values used by the official pipeline (ImageNet statistics)."""
    norm = _raw()["image_norm"]
    return tuple(norm["mean"]), tuple(norm["std"])
