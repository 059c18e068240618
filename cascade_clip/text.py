"""Class-name embeddings from open_clip's text tower, as the official ``.npy`` files were made, with a disk cache.

Recipe (``datasets.json`` ``prompt_templates``): for each template, tokenise ``template.format(name)``, encode, L2-normalise;
average over templates; L2-normalise again. ``"single"`` is the official VOC template ``a photo of a {}``; ``"multi"`` is
the 15-template set of Context and COCO.

Text weights come from an open_clip pretrained tag, a local CLIP file (OpenAI's ``ViT-B-16.pt`` included), or the
``text_encoder.*`` tensors inside an official Cascade-CLIP checkpoint (CLIP ViT-B/16's text tower under another prefix).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write
from .catalog import prompt_templates
from .clip_arch import create_clip

OFFICIAL_TEXT_PREFIX = "text_encoder."
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cascade_clip", "text")


def resolve_templates(templates: Union[str, Sequence[str]]) -> list:
    """``"single"``/``"multi"`` or an explicit list of templates containing ``{}``."""
    if isinstance(templates, str):
        return prompt_templates(templates)
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be 'single', 'multi' or a non-empty list of strings with '{{}}': {templates}")
    return templates


def check_class_names(class_names: Sequence[str]) -> list:
    """Strip names and reject an empty list, empty names and duplicates."""
    names = [str(n).strip() for n in class_names]
    if not names:
        raise ValueError("the class list is empty")
    if any(not n for n in names):
        raise ValueError(f"empty class name in {list(class_names)}")
    # CLIP's tokenizer lower-cases and splits on white space: "Sky" and "sky", "fire hydrant" and "fire  hydrant" are
    # one class
    folded = [" ".join(n.casefold().split()) for n in names]
    duplicates = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
    if duplicates:
        raise ValueError(f"duplicate class names (compared without case and spacing): {duplicates}")
    return names


def warn_truncated_prompts(tokenizer, prompts: Sequence[str], names: Sequence[str]) -> None:
    """Warn about class names whose prompt is longer than CLIP's context (77 tokens): the tokenizer cuts it, so names
    that differ only past the cut get one embedding. Only for tokenizers that can count (open_clip's BPE one)."""
    encode = getattr(tokenizer, "encode", None)
    context = getattr(tokenizer, "context_length", None)
    if encode is None or not context:
        return
    long = [name for prompt, name in zip(prompts, names) if len(encode(prompt)) + 2 > context]  # + start and end
    if long:
        import warnings

        shown = ", ".join(repr(n[:40] + ("..." if len(n) > 40 else "")) for n in long[:3])
        warnings.warn(f"{len(long)} class name(s) exceed CLIP's {context}-token context in their prompt and are cut "
                      f"there ({shown}); names that differ only past the cut get the same embedding", stacklevel=3)


def text_state_from_official(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The open_clip text-tower state dict held in an official checkpoint's ``text_encoder.*`` keys."""
    state = {k[len(OFFICIAL_TEXT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_TEXT_PREFIX)}
    if not state:
        raise ValueError("the checkpoint has no text_encoder.* weights")
    return state


def build_text_model(
    clip_model: str = "ViT-B-16",
    pretrained: Optional[str] = None,
    *,
    official_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    quick_gelu: bool = True,
) -> torch.nn.Module:
    """An open_clip CLIP model whose text tower is loaded from ``pretrained`` or an official checkpoint."""
    model = create_clip(clip_model, None if official_state_dict is not None else pretrained, quick_gelu)
    if official_state_dict is not None:
        state = text_state_from_official(official_state_dict)
        expected = model.state_dict()
        bad = [k for k, v in state.items() if k not in expected or expected[k].shape != v.shape]
        if bad:
            raise ValueError(f"text_encoder weights do not fit {clip_model!r}: {bad[:8]}")
        missing = [
            k for k in expected if not k.startswith("visual.") and k not in state and k not in ("logit_scale", "logit_bias", "attn_mask")
        ]
        if missing:
            raise ValueError(f"text_encoder weights lack {missing[:8]}")
        model.load_state_dict(state, strict=False)
    return model.eval()


@torch.no_grad()
def encode_class_names(
    model: torch.nn.Module,
    class_names: Sequence[str],
    templates: Union[str, Sequence[str]] = "single",
    *,
    clip_model: Optional[str] = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """(C, D) float32 L2-normalised embeddings of ``class_names`` with ``model``'s text tower."""
    import open_clip

    names = check_class_names(class_names)
    templates = resolve_templates(templates)
    tokenizer = open_clip.get_tokenizer(clip_model) if clip_model else open_clip.tokenize
    device = next(model.parameters()).device
    total = None
    for index, template in enumerate(templates):
        prompts = [template.format(name) for name in names]
        if index == 0:
            warn_truncated_prompts(tokenizer if clip_model else getattr(open_clip.tokenizer, "_tokenizer", None),
                                   prompts, names)
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        embedded = torch.cat(chunks)
        total = embedded if total is None else total + embedded
    return F.normalize(total / len(templates), dim=-1).cpu()


def _fingerprint(weights: Optional[str]) -> str:
    if weights and os.path.isfile(weights):
        stat = os.stat(weights)
        return f"file:{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"tag:{weights}"


def cache_key(clip_model: str, weights: Optional[str], templates: Sequence[str], class_names: Sequence[str],
              quick_gelu: bool = True) -> str:
    """Hex key of everything that determines an embedding: model, its activation, weights identity, templates, class
    names."""
    payload = json.dumps([clip_model, bool(quick_gelu), _fingerprint(weights), list(templates), list(class_names)])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def save_embeddings(path: str, embeddings: torch.Tensor) -> None:
    """Write (C, D) embeddings as .npy atomically (temp file + rename): never a half-written file."""
    with atomic_write(path) as f:
        np.save(f, embeddings.detach().float().cpu().numpy())


def load_embeddings(path: str, dim: Optional[int] = None) -> torch.Tensor:
    """A (C, D) ``.npy`` of class embeddings as float32, values as stored.

    Official files are fp16 and not renormalised; the official model uses them as they are, and so does this.
    """
    if not os.path.isfile(path):
        raise ValueError(f"text embeddings file not found: {path}")
    try:
        array = np.load(path)
    except Exception as exc:
        raise ValueError(f"{path}: not a .npy array ({type(exc).__name__}: {exc})") from exc
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{path}: text embeddings must be a (C, D) array with C >= 1, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{path}: embeddings are {array.shape[1]} wide, the model needs {dim}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: embeddings must be floating point, got {array.dtype}")
    values = array.astype(np.float32)
    broken = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if broken.size:
        raise ValueError(f"{path}: rows {broken[:5].tolist()} hold NaN or inf values")
    empty = np.flatnonzero(~values.any(axis=1))
    if empty.size:
        raise ValueError(f"{path}: rows {empty[:5].tolist()} are all zeros (no class direction)")
    return torch.from_numpy(values)


def class_embeddings(
    class_names: Sequence[str],
    *,
    clip_model: str = "ViT-B-16",
    pretrained: Optional[str] = None,
    official_checkpoint: Optional[str] = None,
    templates: Union[str, Sequence[str]] = "single",
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
    device: Union[str, torch.device] = "cpu",
    quick_gelu: bool = True,
) -> torch.Tensor:
    """(C, D) embeddings of ``class_names``, from the disk cache when the same request was made before.

    Weights: ``official_checkpoint`` (its ``text_encoder.*``) if given, else ``pretrained`` (tag or file), else random
    (random weights are never cached: each build draws new ones). ``quick_gelu``: the text tower's activation, which
    must be the one its weights were trained with (QuickGELU for OpenAI's CLIP; the model's ``cfg.quick_gelu``).
    """
    names = check_class_names(class_names)
    template_list = resolve_templates(templates)
    weights = official_checkpoint or pretrained
    path = None
    if cache_dir and weights is not None:
        path = os.path.join(cache_dir, f"{clip_model}-{cache_key(clip_model, weights, template_list, names, quick_gelu)}.npy")
        if os.path.isfile(path):
            return load_embeddings(path)
    official_state = None
    if official_checkpoint is not None:
        from .official import read_checkpoint

        official_state = read_checkpoint(official_checkpoint)
    model = build_text_model(clip_model, pretrained, official_state_dict=official_state, quick_gelu=quick_gelu).to(device)
    embeddings = encode_class_names(model, names, template_list, clip_model=clip_model)
    if path is not None:
        save_embeddings(path, embeddings)
    return embeddings
