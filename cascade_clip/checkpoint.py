"""Checkpoints: this project's format (atomic writes), and loading a model from ours or an official one.

This project's checkpoint is a dict with ``format`` = :data:`FORMAT`, ``model`` (the unwrapped model's state dict),
``model_config`` (:meth:`ModelConfig.to_dict`), and whatever else the trainer adds (``optimizer``, ``scheduler``,
``iteration``, ``rng``, ``train_config``). An official checkpoint (mmseg layout) has no config: its preset is recognised
(:func:`official_preset`: the dataset from the prompt-token count, VOC 10, Context 35, COCO 50; inductive or
self-training from the mmseg config stored in the checkpoint's meta, else from the loss buffer's size) unless one is
given.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch

from .atomic import atomic_write
from .catalog import dataset_info
from .config import ModelConfig
from .official import LOSS_BUFFER_KEY, read_checkpoint
from .safe_load import load_checkpoint_file

if TYPE_CHECKING:  # the model module imports this one's users; only the annotation needs it here
    from .model import CascadeCLIP

FORMAT = "cascade-clip/1"
_PRESET_BY_PROMPTS = {10: "voc", 35: "context", 50: "coco"}


def save_atomic(path: str, payload: Mapping[str, Any]) -> None:
    """torch.save through a temporary file, synced, then renamed: a crash never leaves a truncated file."""
    with atomic_write(path, fsync=True) as f:
        torch.save(dict(payload), f)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: never half a file."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def save_model_checkpoint(path: str, model, **extra: Any) -> None:
    """Write ``model`` (unwrapped from DDP/compile) and its config in this project's format, plus ``extra`` entries."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    save_atomic(path, {"format": FORMAT, "model": model.state_dict(), "model_config": model.cfg.to_dict(), **extra})


def read_any_checkpoint(path: str) -> Dict[str, Any]:
    """The raw checkpoint dict at ``path`` (ours: full dict; official: {'official_state_dict': ..., 'official_meta':
    the mmcv checkpoint's ``meta`` or None})."""
    raw = load_checkpoint_file(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return raw
    meta = raw.get("meta") if isinstance(raw, dict) and isinstance(raw.get("state_dict"), Mapping) else None
    return {
        "official_state_dict": read_checkpoint(raw if isinstance(raw, dict) else path),
        "official_meta": meta if isinstance(meta, Mapping) else None,
    }




class AmbiguousCheckpointWarning(UserWarning):
    """An official checkpoint whose tensors and meta do not say whether it is the inductive or the ``-st`` model."""

_SELF_TRAINING_SETTING = re.compile(r"\bself_training\s*=\s*(True|False)\b")


def _self_training_from_meta(meta: Optional[Mapping[str, Any]]) -> Optional[bool]:
    """Whether an mmseg checkpoint's ``meta`` says its model was self-trained, None when it does not say.

    mmseg's training script stores the config's text (``meta['config']``, with the model's ``self_training=...``)
    and the config file's name (``meta['exp_name']``; every official transductive config's name ends in ``_st``)."""
    if not isinstance(meta, Mapping):
        return None
    config = meta.get("config")
    if isinstance(config, str):
        settings = _SELF_TRAINING_SETTING.findall(config)
        if settings:
            return settings[-1] == "True"  # the last assignment wins, as in the config file
    exp_name = meta.get("exp_name")
    if isinstance(exp_name, str) and exp_name.endswith(".py"):
        return os.path.splitext(os.path.basename(exp_name))[0].endswith("_st")
    return None


def official_dataset(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The dataset an official checkpoint was trained on, from its prompt-token count (VOC 10, Context 35, COCO 50)."""
    prompts = state_dict.get("backbone.prompt_embeddings")
    if prompts is None:
        raise ValueError("not an official Cascade-CLIP checkpoint: backbone.prompt_embeddings is missing")
    tokens = prompts.shape[1]
    if tokens not in _PRESET_BY_PROMPTS:
        raise ValueError(f"official checkpoint with {tokens} prompt tokens matches no preset (10, 35, 50); pass a config")
    return _PRESET_BY_PROMPTS[tokens]


def official_preset(state_dict: Mapping[str, torch.Tensor], meta: Optional[Mapping[str, Any]] = None) -> str:
    """The preset an official checkpoint was trained with: the dataset from its prompt-token count; inductive or
    self-training (``-st``, no seen calibration at test time) from the mmseg config in ``meta`` when the checkpoint
    kept it, else from its loss buffer.

    The official loss keeps ``empty_weight = ones(num_classes + 1)``. The VOC configs set ``num_classes`` to the
    classes they train on (16 entries inductive, 21 self-training: MODEL_SPEC.md section 7, item 15), but the Context
    and COCO-Stuff self-training configs keep the seen count, like their inductive ones: for those two the buffer
    cannot tell the variants apart, so a checkpoint without its config is taken as inductive with a warning that says
    how to evaluate it as ``-st``. A checkpoint without the buffer is taken as inductive.
    """
    dataset = official_dataset(state_dict)
    self_training = _self_training_from_meta(meta)
    if self_training is not None:
        return f"{dataset}-st" if self_training else dataset
    buffer = state_dict.get(LOSS_BUFFER_KEY)
    if buffer is None:
        return dataset
    info = dataset_info(dataset)
    trained = buffer.numel() - 1
    if trained == len(info.classes):
        return f"{dataset}-st"
    if trained == len(info.seen) and dataset != "voc":
        warnings.warn(
            f"official {dataset} checkpoint without its mmseg config: its tensors cannot tell the inductive model from "
            f"the self-training one ({LOSS_BUFFER_KEY} has seen+1 = {buffer.numel()} entries in both official {dataset} "
            f"configs); taking it as inductive (seen calibration {ModelConfig.preset(dataset).seen_calibration}). "
            f"For the {dataset}-st model, evaluate without calibration: eval --set model.seen_calibration=0, "
            f"predict --no-calibration, or config=ModelConfig.preset('{dataset}-st')",
            AmbiguousCheckpointWarning,
            stacklevel=2,
        )
    elif trained != len(info.seen):
        warnings.warn(
            f"official {dataset} checkpoint: {LOSS_BUFFER_KEY} has {buffer.numel()} entries, neither seen+1 "
            f"({len(info.seen) + 1}, inductive) nor all+1 ({len(info.classes) + 1}, self-training); taking it as "
            f"inductive (seen calibration {ModelConfig.preset(dataset).seen_calibration}); pass a config to choose",
            stacklevel=2,
        )
    return dataset


def load_model(
    path: str, *, config: Optional[ModelConfig] = None, map_location: str = "cpu", **overrides: Any
) -> Tuple["CascadeCLIP", Dict[str, Any]]:
    """Build and load a model from a checkpoint of this project or an official one.

    ``config`` replaces the stored/recognised configuration; ``overrides`` change fields of it (e.g. ``crop_size``).
    Returns the model in eval mode and the raw checkpoint dict.
    """
    from .model import CascadeCLIP

    raw = read_any_checkpoint(path)
    official = raw.get("official_state_dict")
    if config is None:
        if official is not None:
            with warnings.catch_warnings():
                if "seen_calibration" in overrides:  # the caller already chose what the preset would decide
                    warnings.simplefilter("ignore", AmbiguousCheckpointWarning)
                config = ModelConfig.preset(official_preset(official, raw.get("official_meta")))
        else:
            config = ModelConfig.from_dict(raw["model_config"])
    values = config.to_dict()
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}")
    values.update(overrides)
    # The checkpoint holds every CLIP weight: building with the recorded clip_pretrained would only re-read (or
    # download) weights that are overwritten next, and fail if that file has moved since training.
    values["clip_pretrained"] = None
    cfg = ModelConfig.from_dict(values)
    model = CascadeCLIP(cfg)
    if official is not None:
        model.load_official_state_dict(official)
    else:
        try:
            model.load_state_dict(raw["model"], strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: checkpoint does not match the model configuration:\n{exc}") from exc
    return model.to(map_location).eval(), raw
