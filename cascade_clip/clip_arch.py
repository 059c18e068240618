"""Building the open_clip CLIP model that the backbone wraps, and reading CLIP weights from local files.

The package registers one extra open_clip architecture, ``cascade-tiny`` (a 12-block ViT of width 192, patch 16, 64 px,
embedding 64, with a 2-layer text tower): the sizes of the official implementation's small golden model, so tests and
the offline demo run on a CPU in seconds and nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Optional

import torch

from .torchscript_weights import TorchScriptArchiveError, is_torchscript_archive, read_torchscript_state_dict

TINY_MODEL_NAME = "cascade-tiny"
# A `pretrained` value with one of these endings is a file (a missing one is a named error), never an open_clip tag.
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"{TINY_MODEL_NAME}.json")
_registered = False


def register_architectures() -> None:
    """Make ``cascade-tiny`` known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CONFIG)
    _registered = True


def read_clip_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read CLIP weights from ``path``: OpenAI's TorchScript ``ViT-B-16.pt``, or a (possibly wrapped) state dict.

    Returns open_clip-layout keys (``visual.*``, ``transformer.*``, ...), which are also OpenAI's own names.
    """
    if not os.path.isfile(path):
        raise ValueError(f"CLIP weights file not found: {path}")
    if is_torchscript_archive(path):
        # OpenAI's release files are TorchScript archives; their weights are read without TorchScript
        try:
            state_dict = read_torchscript_state_dict(path)
        except TorchScriptArchiveError as exc:
            warnings.warn(f"{exc}; reading it with torch.jit.load instead (which runs the archive's code)", stacklevel=2)
            with warnings.catch_warnings():
                # deprecated (a FutureWarning in torch 2.14, a DeprecationWarning in 2.11), but such a file needs it
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load", category=FutureWarning)
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load", category=DeprecationWarning)
                try:
                    state_dict = torch.jit.load(path, map_location="cpu").state_dict()
                except (RuntimeError, ValueError, OSError) as jit_exc:  # a damaged archive: a named user error
                    raise ValueError(f"{exc}; torch.jit.load cannot read it either: {jit_exc}") from jit_exc
    else:
        from .safe_load import load_checkpoint_file

        checkpoint = load_checkpoint_file(path)
        state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path}: not a CLIP state dict or TorchScript archive")
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state_dict.pop(key, None)
    return state_dict


def create_clip(name: str, pretrained: Optional[str] = None, quick_gelu: bool = True) -> torch.nn.Module:
    """An open_clip CLIP model ``name`` at its native resolution, random or with ``pretrained`` weights.

    ``pretrained`` is a local file (read here, never downloaded) or an open_clip pretrained tag such as ``"openai"``
    (open_clip fetches tagged weights from its hub or cache: only when the user asks for a tag). ``quick_gelu``
    decides the activation for every architecture, also those whose open_clip config names one (``cascade-tiny``,
    the ``-quickgelu`` variants): open_clip's ``force_quick_gelu`` alone can only switch QuickGELU on.
    """
    register_architectures()
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    if pretrained is not None and (os.path.isfile(pretrained) or os.sep in pretrained
                                   or pretrained.endswith(WEIGHT_FILE_SUFFIXES)):
        model = create_clip(name, None, quick_gelu)
        state_dict = read_clip_state_dict(pretrained)
        expected = model.state_dict()
        mismatched = [
            f"{k}: file {tuple(v.shape)} vs {name} {tuple(expected[k].shape)}"
            for k, v in state_dict.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if mismatched:
            raise ValueError(f"{pretrained}: CLIP weights do not fit architecture {name!r}: {mismatched[:8]}")
        result = model.load_state_dict(state_dict, strict=False)
        missing_visual = [k for k in result.missing_keys if k.startswith("visual.")]
        if missing_visual:
            raise ValueError(f"{pretrained}: CLIP weights lack image-tower keys {missing_visual[:8]}")
        if result.unexpected_keys:
            warnings.warn(f"{pretrained}: ignored keys not in {name}: {result.unexpected_keys[:8]}")
        return model
    if pretrained is None:
        # open_clip logs a warning for every random-weight model; random weights are what was asked for here.
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, quick_gelu=quick_gelu)
        finally:
            logging.disable(previous)
    return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu, quick_gelu=quick_gelu)
