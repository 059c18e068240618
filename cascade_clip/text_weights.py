"""Which CLIP text weights embed the class names for ``embed-text``, ``predict`` and :class:`Segmenter`.

Precedence: explicit CLIP weights (open_clip tag or local file) > the ``text_encoder.*`` weights inside an official
Cascade-CLIP checkpoint > the ``clip_pretrained`` recorded in this project's checkpoint config. Without any of them
there is no meaningful text tower, which is an error (random text weights would give random classes).
The embeddings themselves always come from :func:`cascade_clip.text.class_embeddings` (one recipe, one disk cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .clip_arch import WEIGHT_FILE_SUFFIXES
from .text import DEFAULT_CACHE_DIR, OFFICIAL_TEXT_PREFIX, class_embeddings, load_embeddings


@dataclass(frozen=True)
class TextWeights:
    """Arguments for :func:`cascade_clip.text.class_embeddings`: architecture and where its text weights come from."""

    clip_model: str
    pretrained: Optional[str] = None  # open_clip tag or local CLIP file
    official_checkpoint: Optional[str] = None  # path of an official checkpoint holding text_encoder.*
    quick_gelu: bool = True  # the activation the weights were trained with (OpenAI's CLIP: QuickGELU)

    def describe(self) -> str:
        if self.official_checkpoint:
            return f"{self.clip_model} text tower from {self.official_checkpoint} (text_encoder.*)"
        return f"{self.clip_model} text tower from {self.pretrained}"


def pick_text_weights(
    *,
    clip_model: str,
    clip_weights: Optional[str] = None,
    checkpoint_path: Optional[str] = None,
    checkpoint_raw: Optional[Mapping[str, Any]] = None,
    checkpoint_config=None,
    quick_gelu: Optional[bool] = None,
) -> TextWeights:
    """Pick the text weights by the precedence above.

    ``checkpoint_raw`` is :func:`cascade_clip.checkpoint.read_any_checkpoint`'s dict for ``checkpoint_path``;
    ``checkpoint_config`` the :class:`ModelConfig` it holds (for ``clip_pretrained`` and, unless ``quick_gelu`` is
    given, the activation of its CLIP; official checkpoints hold OpenAI's, QuickGELU).
    """
    if quick_gelu is None:
        quick_gelu = bool(getattr(checkpoint_config, "quick_gelu", True))
    if clip_weights:
        return TextWeights(clip_model, pretrained=clip_weights, quick_gelu=quick_gelu)
    official = (checkpoint_raw or {}).get("official_state_dict")
    if official is not None and any(k.startswith(OFFICIAL_TEXT_PREFIX) for k in official):
        return TextWeights(clip_model, official_checkpoint=checkpoint_path, quick_gelu=quick_gelu)
    pretrained = getattr(checkpoint_config, "clip_pretrained", None)
    names_a_file = pretrained and (os.sep in pretrained or pretrained.endswith(WEIGHT_FILE_SUFFIXES))
    if names_a_file and not os.path.isfile(pretrained):
        raise ValueError(
            f"{checkpoint_path} records its CLIP weights as {pretrained} (model.clip_pretrained), which is not there "
            f"anymore; {_PASS_WEIGHTS}"
        )
    if pretrained:
        return TextWeights(clip_model, pretrained=pretrained, quick_gelu=quick_gelu)
    where = f"{checkpoint_path} has no text_encoder.* weights and no clip_pretrained; " if checkpoint_path else ""
    raise ValueError(f"{where}no CLIP text weights to embed the class names; {_PASS_WEIGHTS}")


_PASS_WEIGHTS = (
    "pass CLIP weights, an open_clip tag such as 'openai' or a local file (predict, embed-text: --clip-weights; "
    "eval: --set model.clip_pretrained=...), or precomputed class embeddings (predict, eval: --text-embeddings FILE.npy)"
)


def embeddings_for(
    names: Sequence[str],
    weights: TextWeights,
    *,
    templates: Union[str, Sequence[str]] = "single",
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """(C, D) L2-normalised embeddings of ``names`` with ``weights`` (disk cache of :mod:`cascade_clip.text`)."""
    return class_embeddings(
        names,
        clip_model=weights.clip_model,
        pretrained=weights.pretrained,
        official_checkpoint=weights.official_checkpoint,
        templates=templates,
        cache_dir=cache_dir,
        device=device,
        quick_gelu=weights.quick_gelu,
    )


def embeddings_from_file(path: str, names: Sequence[str], dim: Optional[int] = None) -> torch.Tensor:
    """A precomputed (C, D) ``.npy`` whose row count must equal the number of class names."""
    embeddings = load_embeddings(path, dim=dim)
    if embeddings.shape[0] != len(names):
        raise ValueError(
            f"{path}: {embeddings.shape[0]} text embeddings for {len(names)} class names {list(names)[:8]}"
        )
    return embeddings
