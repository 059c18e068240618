"""cascade-clip: a fast, faithful Cascade-CLIP (ICML 2024) for zero-shot semantic segmentation.

The model API is imported lazily, so ``import cascade_clip.ops`` / ``cascade_clip.kernels`` stays light (no open_clip).
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["CascadeCLIP", "ModelConfig", "ops", "__version__"]

_LAZY = {"CascadeCLIP": "cascade_clip.model", "ModelConfig": "cascade_clip.config", "Segmenter": "cascade_clip.segmenter"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "ops":
        import importlib

        return importlib.import_module("cascade_clip.ops")
    raise AttributeError(f"module 'cascade_clip' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from . import ops
    from .config import ModelConfig
    from .model import CascadeCLIP
