"""Reading checkpoint files without running code from them.

``torch.load`` unpickles, and a pickle can run arbitrary code; checkpoints are often downloaded (the official ones
are). Every checkpoint this package reads goes through :func:`load_checkpoint_file`: ``weights_only`` loading, which
builds tensors and plain containers only, with numpy arrays allowed (this project's checkpoints keep numpy's RNG state,
and mmcv's meta may hold arrays). A file that needs anything else is refused with the names it asks for, unless the
user says the file is trusted (``CASCADE_CLIP_TRUST_CHECKPOINTS=1``).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, List

import numpy as np
import torch

TRUST_VARIABLE = "CASCADE_CLIP_TRUST_CHECKPOINTS"


def _numpy_globals() -> List[Any]:
    """What unpickling numpy arrays and scalars needs: their reconstructors, ndarray, dtype and the concrete dtype
    classes (mmcv's meta can hold scalars, e.g. an EvalHook's best score)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    dtype_classes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUV"]
    found = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]
    # files pickled under numpy 1 name the same functions numpy.core.multiarray.*: allowed under both names
    aliases = [(fn, f"numpy.core.multiarray.{fn.__name__}") for fn in (core.multiarray._reconstruct,
                                                                      core.multiarray.scalar)]
    return found + aliases


def _qualified_name(obj: Any) -> str:
    if isinstance(obj, tuple):  # (object, the name a file may use for it)
        return obj[1]
    return f"{obj.__module__}.{obj.__qualname__}"


def load_checkpoint_file(path: str) -> Any:
    """``torch.load(path)`` on the CPU with ``weights_only`` (numpy arrays allowed); ValueError naming the file when
    it cannot be read or needs other Python objects (loaded anyway when ``CASCADE_CLIP_TRUST_CHECKPOINTS=1``)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if os.environ.get(TRUST_VARIABLE) == "1":
            return torch.load(path, map_location="cpu", weights_only=False)
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint (corrupt, or torch's legacy format)
            needed = []
        allowed = {_qualified_name(g) for g in _numpy_globals()}
        needed = [name for name in needed if name not in allowed]  # torch lists them even when allowed
        if not needed:
            raise ValueError(
                f"{path}: cannot read as a PyTorch checkpoint (not a tensors-only file: corrupt, or a legacy pickle; "
                f"if it is a legacy file you trust, set {TRUST_VARIABLE}=1)"
            ) from exc
        raise ValueError(
            f"{path}: holds Python objects beyond tensors and plain data ({', '.join(needed)}); unpickling them could "
            f"run code from the file. If you trust it, set {TRUST_VARIABLE}=1"
        ) from exc
    except Exception as exc:  # a clear message instead of an unpickling traceback
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
