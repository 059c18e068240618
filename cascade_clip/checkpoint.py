"""Checkpoints: this project's format (atomic writes), and loading a model from ours or an official one.

This project's checkpoint is a dict with ``format`` = :data:`FORMAT`, ``model`` (the unwrapped model's state dict),
``model_config`` (:meth:`ModelConfig.to_dict`), and whatever else the trainer adds (``optimizer``, ``scheduler``,
``iteration``, ``rng``, ``train_config``). An official checkpoint (mmseg layout) has no config: its preset is recognised
(:func:`official_preset`: the dataset from the prompt-token count, VOC 10, Context 35, COCO 50; inductive or
self-training from the loss buffer's size) unless one is given.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch

from .catalog import dataset_info
from .config import ModelConfig
from .official import read_checkpoint

if TYPE_CHECKING:  # the model module imports this one's users; only the annotation needs it here
    from .model import CascadeCLIP

FORMAT = "cascade-clip/1"
_PRESET_BY_PROMPTS = {10: "voc", 35: "context", 50: "coco"}


def save_atomic(path: str, payload: Mapping[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model_checkpoint(path: str, model, **extra: Any) -> None:
    """Write ``model`` (unwrapped from DDP/compile) and its config in this project's format, plus ``extra`` entries."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    save_atomic(path, {"format": FORMAT, "model": model.state_dict(), "model_config": model.cfg.to_dict(), **extra})


def read_any_checkpoint(path: str) -> Dict[str, Any]:
    """The raw checkpoint dict at ``path`` (ours: full dict; official: {'official_state_dict': ...})."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return raw
    return {"official_state_dict": read_checkpoint(raw if isinstance(raw, dict) else path)}


_LOSS_BUFFER = "decode_head.loss_decode.criterion.empty_weight"


def official_preset(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The preset an official checkpoint was trained with: the dataset from its prompt-token count, inductive or
    self-training (``-st``, no seen calibration at test time) from its loss buffer.

    The official loss keeps ``empty_weight = ones(num_classes + 1)`` of the classes it trains on: the seen classes in
    an inductive config, all of them in a self-training one (MODEL_SPEC.md section 7, item 15: 16 against 21 for VOC).
    A checkpoint without that buffer is taken as inductive.
    """
    prompts = state_dict.get("backbone.prompt_embeddings")
    if prompts is None:
        raise ValueError("not an official Cascade-CLIP checkpoint: backbone.prompt_embeddings is missing")
    tokens = prompts.shape[1]
    if tokens not in _PRESET_BY_PROMPTS:
        raise ValueError(f"official checkpoint with {tokens} prompt tokens matches no preset (10, 35, 50); pass a config")
    dataset = _PRESET_BY_PROMPTS[tokens]
    buffer = state_dict.get(_LOSS_BUFFER)
    if buffer is None:
        return dataset
    info = dataset_info(dataset)
    trained = buffer.numel() - 1
    if trained == len(info.classes):
        return f"{dataset}-st"
    if trained != len(info.seen):
        warnings.warn(
            f"official {dataset} checkpoint: {_LOSS_BUFFER} has {buffer.numel()} entries, neither seen+1 "
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
        config = ModelConfig.preset(official_preset(official)) if official is not None else ModelConfig.from_dict(raw["model_config"])
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
