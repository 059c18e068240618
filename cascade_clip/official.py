"""Conversion between official Cascade-CLIP checkpoints (mmseg layout) and this package's model.

The official segmentor's state dict has ``backbone.*`` (named as here), ``decode_head.*`` (our ``head.*``) and
``text_encoder.*``. Keys whose tensors the official forward pass never uses are skipped on purpose
(:data:`SKIPPED_KEY_PATTERNS`); any other key that does not match, or a shape mismatch, is an error that lists them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Union

import torch

from .backbone import resize_pos_grid

# (pattern, why it is skipped). The official forward never reads these tensors (MODEL_SPEC.md sections 3.3, 5, 7).
SKIPPED_KEY_PATTERNS = (
    (r"^text_encoder\.", "the CLIP text tower is built and saved but never run by the official segmentor"),
    (r"^decode_head\.cascade_decoders\.\d+\.layers\.\d+\.self_attn\.", "decoder self-attention is never called"),
    (r"^decode_head\.cascade_decoders\.\d+\.layers\.\d+\.norm1\.", "decoder norm1 is never called"),
    (r"^decode_head\.loss_decode\.criterion\.empty_weight$", "unused loss buffer"),
)

# The official loss's buffer ``ones(num_classes + 1)`` with its last entry 0.1 (MODEL_SPEC.md section 5). The forward
# never reads it, but its length is the class count the loss was configured with, which tells the VOC self-training
# checkpoint from the inductive one (:func:`cascade_clip.checkpoint.official_preset`); exports write it for that.
LOSS_BUFFER_KEY = "decode_head.loss_decode.criterion.empty_weight"
_NO_OBJECT_WEIGHT = 0.1


def loss_buffer(num_classes: int) -> torch.Tensor:
    """The official ``criterion.empty_weight`` of a loss over ``num_classes`` classes."""
    weight = torch.ones(num_classes + 1)
    weight[-1] = _NO_OBJECT_WEIGHT
    return weight

_PREFIXES = (("backbone.", "backbone."), ("decode_head.", "head."))


def skip_reason(official_key: str):
    """Why ``official_key`` is skipped on load, or None if it must map onto the model."""
    for pattern, reason in SKIPPED_KEY_PATTERNS:
        if re.search(pattern, official_key):
            return reason
    return None


def to_model_key(official_key: str):
    for official, ours in _PREFIXES:
        if official_key.startswith(official):
            return ours + official_key[len(official):]
    return None


def to_official_key(model_key: str) -> str:
    for official, ours in _PREFIXES:
        if model_key.startswith(ours):
            return official + model_key[len(ours):]
    raise KeyError(f"model key {model_key!r} has no official name")


@dataclass
class LoadReport:
    """What :func:`convert_official_state_dict` did: loaded keys, skipped keys (with reasons)."""

    loaded: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)


def read_checkpoint(source: Union[str, os.PathLike, Mapping]) -> Dict[str, torch.Tensor]:
    """A state dict from a path to a ``.pth`` (mmcv ``{'meta', 'state_dict', ...}`` or a bare dict) or a mapping."""
    if isinstance(source, (str, os.PathLike)):
        from .safe_load import load_checkpoint_file

        source = load_checkpoint_file(os.fspath(source))
    if not isinstance(source, Mapping):
        raise ValueError(f"expected a state dict, got {type(source).__name__}")
    if str(source.get("format", "")).startswith("cascade-clip/"):  # checkpoint.FORMAT
        raise ValueError("a checkpoint of this project, not an official one: load it with "
                         "cascade_clip.checkpoint.load_model(path), or model.load_state_dict(checkpoint['model'])")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}


def convert_official_state_dict(
    official: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
) -> "tuple[Dict[str, torch.Tensor], LoadReport]":
    """Map an official state dict onto ``model_state``'s keys; raise ValueError listing every mismatch."""
    report = LoadReport()
    converted: Dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in official.items():
        reason = skip_reason(key)
        if reason is not None:
            report.skipped[key] = reason
            continue
        ours = to_model_key(key)
        if ours is None or ours not in model_state:
            unexpected.append(key)
            continue
        converted[ours] = value

    prompts = converted.get("backbone.prompt_embeddings")
    expected_prompts = model_state["backbone.prompt_embeddings"].shape
    if prompts is not None and prompts.shape != expected_prompts and prompts.shape[1] == expected_prompts[1]:
        raise ValueError(
            f"checkpoint prompts are {tuple(prompts.shape)}, the model's {tuple(expected_prompts)}: the same "
            "prompt count at another width, so the checkpoint was trained on another CLIP architecture "
            "(ModelConfig clip_model; the official checkpoints: ViT-B-16)"
        )
    if prompts is not None and prompts.shape != expected_prompts:
        raise ValueError(
            f"checkpoint has {prompts.shape[1]} prompt tokens but the model has {expected_prompts[1]}: "
            "it was trained for another dataset preset (VOC 10, Context 35, COCO 50); build the model with "
            f"ModelConfig.preset(..., num_prompt_tokens={prompts.shape[1]})"
        )
    pos = converted.get("backbone.positional_embedding")
    expected_pos = model_state["backbone.positional_embedding"].shape
    if pos is not None and pos.shape != expected_pos and pos.shape[1:] == expected_pos[1:]:
        # A checkpoint trained at another crop size: resize its grid the official way.
        side = int(round((expected_pos[0] - 1) ** 0.5))
        converted["backbone.positional_embedding"] = torch.cat([pos[:1], resize_pos_grid(pos[1:], (side, side))])

    missing = sorted(set(model_state) - set(converted))
    mismatched = [
        f"{to_official_key(k)}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in converted.items()
        if v.shape != model_state[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {[to_official_key(k) for k in missing]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError("official checkpoint does not match the model configuration:\n  " + "\n  ".join(problems))
    report.loaded = sorted(converted)
    return converted, report
