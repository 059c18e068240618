"""Where a run's class embeddings come from: a ``.npy`` file, CLIP's text tower, or fixed random vectors.

* ``--text-embeddings FILE.npy``: a (C, D) array (the official fp16 files work as they are); C must equal the number
  of classes and D the model's embedding width.
* Otherwise open_clip's text encoder for ``model.clip_model`` with ``model.clip_pretrained`` weights and the dataset's
  prompt templates (:func:`cascade_clip.text.class_embeddings`, cached on disk).
* With random CLIP weights (``clip_pretrained`` unset, e.g. ``cascade-tiny``) the text tower is drawn from a fixed
  seed, so the embeddings are arbitrary but identical in every process and every run (training, evaluation, each
  DDP rank): the model learns to map them, as the built-in synthetic job does.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

RANDOM_TEXT_SEED = 0


def load_text(
    class_names: Sequence[str],
    *,
    embed_dim: int,
    clip_model: str,
    clip_pretrained: Optional[str],
    templates: str = "single",
    path: Optional[str] = None,
    quick_gelu: bool = True,
) -> torch.Tensor:
    """(C, D) float32 embeddings of ``class_names`` (see the module doc for the sources). ``quick_gelu``: the text
    tower's activation (the model's ``cfg.quick_gelu``)."""
    from .text import class_embeddings, load_embeddings

    if path:
        text = load_embeddings(path, dim=embed_dim)
        if text.shape[0] != len(class_names):
            raise ValueError(
                f"{path}: {text.shape[0]} text embeddings (shape {tuple(text.shape)}) for {len(class_names)} classes; "
                f"the file must hold one row per class, in class order ({len(class_names)}x{embed_dim})"
            )
        return text
    if clip_pretrained is None:
        if clip_model != "cascade-tiny":
            import warnings

            warnings.warn(
                f"model.clip_pretrained is not set: class embeddings come from a random-weight {clip_model} text tower "
                "(fixed but meaningless); set model.clip_pretrained or pass --text-embeddings FILE.npy",
                stacklevel=2,
            )
        # Random text tower drawn from a fixed seed (without disturbing the caller's RNG): fixed, arbitrary vectors.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEXT_SEED)
            text = class_embeddings(class_names, clip_model=clip_model, pretrained=None, templates=templates,
                                    cache_dir=None, quick_gelu=quick_gelu)
    else:
        text = class_embeddings(class_names, clip_model=clip_model, pretrained=clip_pretrained, templates=templates,
                                quick_gelu=quick_gelu)
    if text.shape != (len(class_names), embed_dim):
        raise ValueError(f"text tower of {clip_model} gives {tuple(text.shape)} embeddings, the model needs D={embed_dim}")
    return text
