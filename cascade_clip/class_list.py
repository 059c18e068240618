"""Class lists given on the command line: a dataset preset, a text file, or comma-separated names.

``"voc"``, ``"context"``, ``"coco"`` name the shipped class lists; an existing file gives one class per line
(blank lines and lines starting with ``#`` are skipped); anything else is split on commas
(``"cat,dog,grass"``).
Names are stripped and checked by :func:`cascade_clip.text.check_class_names` (no empty list, no empty or duplicate names).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from .catalog import DATASET_NAMES, dataset_info
from .text import check_class_names


@dataclass(frozen=True)
class ClassList:
    """Parsed class names and, when they came from (or equal) a dataset preset, that preset's name."""

    names: Tuple[str, ...]
    preset: Optional[str] = None


def _read_class_file(path: str) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is not part of a name
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the class file ({type(exc).__name__}: {exc})") from exc
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise ValueError(f"{path}: the class file lists no classes")
    return names


def matching_preset(names: Sequence[str]) -> Optional[str]:
    """The dataset whose full class list equals ``names`` (same order), or None."""
    for dataset in DATASET_NAMES:
        if tuple(names) == dataset_info(dataset).classes:
            return dataset
    return None


# "classes.txt", "my_list.lst", "names.csv": one word, a dot, a short extension (class names are rarely spelled so)
_FILE_NAME = re.compile(r"[^\s,]+\.[A-Za-z][A-Za-z0-9]{0,4}")


def parse_classes(spec: Union[str, Sequence[str]]) -> ClassList:
    """A preset name, a class file, a comma-separated string, or an already split sequence of names."""
    if not isinstance(spec, str):
        names = check_class_names(spec)
        return ClassList(tuple(names), matching_preset(names))
    text = spec.strip()
    if text in DATASET_NAMES:
        return ClassList(dataset_info(text).classes, text)
    if os.path.isfile(text):
        names = check_class_names(_read_class_file(text))
        return ClassList(tuple(names), matching_preset(names))
    if text.lower() in DATASET_NAMES:  # "VOC" is the preset, not one class called VOC
        raise ValueError(f"--classes {text!r}: the presets are {', '.join(DATASET_NAMES)} (lower case); for a class "
                         f"of that name add another class")
    if "," not in text and (os.sep in text or _FILE_NAME.fullmatch(text)):
        # Looks like a path but is not a file: saying so beats segmenting a class called "clases.txt".
        raise ValueError(f"class file not found: {text} (for one class of that name add a comma: '{text},')")
    # a trailing comma ends the list (it makes "classes.txt," one class of that name)
    names = check_class_names(text.removesuffix(",").split(",")) if text else check_class_names([])
    return ClassList(tuple(names), matching_preset(names))


def official_templates(dataset: Optional[str]) -> str:
    """The template set the official embeddings of ``dataset`` used: VOC ``single``, Context and COCO ``multi``."""
    return "single" if dataset in (None, "voc") else "multi"
