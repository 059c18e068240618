"""Backend registry of :mod:`cascade_clip.ops`.

A backend is a named set of functions ``(nga, descriptor, mask_logits, loss_sums)`` with the signatures of
:mod:`cascade_clip.ops.reference` (``loss_sums`` defaults to the reference one). Backends other than ``"reference"``
are loaded lazily by a loader function, so a missing Triton or a C++ extension built for another torch only removes
that backend; it never breaks the import.

The process default is ``"auto"`` unless ``CASCADE_CLIP_BACKEND`` names another backend; :func:`set_backend` changes
it. ``"auto"`` picks, per call, the fastest backend available for the device of the inputs: ``"triton"`` for CUDA
tensors, ``"cpp"`` for CPU tensors, ``"reference"`` otherwise, and for a dtype the chosen backend does not compute
(float64 on CUDA).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import reference

ENV_VAR = "CASCADE_CLIP_BACKEND"
AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """One implementation of the three ops."""

    name: str
    nga: Callable
    descriptor: Callable
    mask_logits: Callable
    # Which tensor devices ("cpu", "cuda") this backend is meant for; "auto" only routes those here.
    devices: tuple = ("cpu", "cuda")
    # The floating-point dtypes its kernels compute; "auto" serves other dtypes (float64 on CUDA) with the reference.
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    # The loss's per-mask sums; a backend without its own computes them with the reference.
    loss_sums: Callable = reference.loss_sums


# name -> "module:function" returning a Backend (or raising ImportError/RuntimeError when unavailable).
# Later issues add their backends here; model code never changes.
_LOADERS: Dict[str, str] = {
    "triton": "cascade_clip.kernels:load_backend",
    "cpp": "cascade_clip._cpp_backend:load_backend",
}
# Preference order of "auto" per device type.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}

_lock = threading.Lock()
_backends: Dict[str, Backend] = {
    "reference": Backend("reference", reference.nga, reference.descriptor, reference.mask_logits)
}
_failed: Dict[str, str] = {}
_default: Optional[str] = None
_auto_choice: Dict[str, Backend] = {}  # device type -> the backend "auto" resolved to


def _try_load(name: str) -> Optional[Backend]:
    if name in _backends:
        return _backends[name]
    if name in _failed or name not in _LOADERS:
        return None
    if torch.compiler.is_compiling():
        # dynamo cannot trace a lock or a module import; a backend must be loaded before its first traced call
        raise RuntimeError(
            f"cascade_clip.ops: the {name!r} backend is first used inside torch.compile; call "
            "cascade_clip.ops.available_backends() (or any op) once before compiling (CascadeCLIP does this itself)"
        )
    module_name, func_name = _LOADERS[name].split(":")
    with _lock:
        if name in _backends:
            return _backends[name]
        try:
            backend = getattr(importlib.import_module(module_name), func_name)()
        except (ImportError, RuntimeError, OSError, AttributeError) as exc:
            _failed[name] = f"{type(exc).__name__}: {exc}"
            return None
        _backends[name] = backend
        return backend


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` did not load (``None`` if it loaded or was never tried)."""
    _try_load(name)
    return _failed.get(name)


def available_backends() -> List[str]:
    """Names of the backends that load in this process, ``"reference"`` first."""
    names = ["reference"]
    for name in _LOADERS:
        if _try_load(name) is not None:
            names.append(name)
    return names


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {type(name).__name__}")
    known = [AUTO, "reference", *_LOADERS]
    if name not in known:
        raise ValueError(f"unknown ops backend {name!r}; known: {known}")
    if name not in (AUTO, "reference") and _try_load(name) is None:
        raise ValueError(f"ops backend {name!r} is not available: {_failed.get(name, 'not loaded')}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"``, ``"reference"``, ``"triton"``, ``"cpp"``)."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The process-wide default backend name (``CASCADE_CLIP_BACKEND`` if set, else ``"auto"``)."""
    global _default
    if _default is None:
        env = os.environ.get(ENV_VAR, AUTO).strip() or AUTO
        try:
            _default = _check_name(env)
        except ValueError as exc:
            warnings.warn(f"{ENV_VAR}={env!r} ignored: {exc}; using 'auto'", stacklevel=3)
            _default = AUTO
    return _default


def _runs_on(backend: Backend, device: torch.device) -> bool:
    # the reference backend is plain PyTorch: any device (its `devices` only guide "auto")
    return backend.name == "reference" or device.type in backend.devices


def _unsupported_dtype(backend: Backend, dtypes: tuple) -> Optional[str]:
    for dtype in dtypes:
        if dtype not in backend.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
            return (f"the {backend.name!r} ops backend computes {names}, not {str(dtype).replace('torch.', '')}; use "
                    "the 'auto' backend (the reference serves other dtypes) or 'reference'")
    return None


def _wrong_device(backend: Backend, device: torch.device) -> str:
    hint = " (Triton runs CPU tensors only under its interpreter, TRITON_INTERPRET=1)" if backend.name == "triton" else ""
    others = " or ".join(repr(n) for n in ("cpp", "reference") if n != backend.name)
    return (f"the {backend.name!r} ops backend runs on {' and '.join(backend.devices)} tensors, these are on "
            f"{device.type}{hint}; use the 'auto' backend (the fastest one for the device) or {others}")


def resolve(name: Optional[str], device: torch.device, dtypes: tuple = ()) -> Backend:
    """The backend that serves a call with ``backend=name`` on tensors of ``device`` with floating-point ``dtypes``."""
    if name is None:
        name = get_backend()
    # fast path (every op call goes through here): a loaded backend by name, or the cached choice of "auto"
    loaded = _backends.get(name) if name != AUTO else _auto_choice.get(device.type)
    if loaded is not None:
        if name == AUTO:
            return loaded if all(dt in loaded.dtypes for dt in dtypes) else _backends["reference"]
        if _runs_on(loaded, device):
            problem = _unsupported_dtype(loaded, dtypes)
            if problem is None:
                return loaded
            raise ValueError(problem)
        raise ValueError(_wrong_device(loaded, device))
    name = _check_name(name)
    if name != AUTO:
        backend = _backends[name] if name in _backends else _try_load(name)
        if not _runs_on(backend, device):
            raise ValueError(_wrong_device(backend, device))
        problem = _unsupported_dtype(backend, dtypes)
        if problem is not None:
            raise ValueError(problem)
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        backend = _try_load(candidate)
        if backend is not None and device.type in backend.devices:
            break
    else:
        backend = _backends["reference"]
    _auto_choice[device.type] = backend  # backends never unload and failures are final, so the choice is too
    return backend if all(dt in backend.dtypes for dt in dtypes) else _backends["reference"]
