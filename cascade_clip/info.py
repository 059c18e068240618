"""``python -m cascade_clip.info``: what this install can run.

Prints the torch / triton / CUDA / open_clip versions, whether the C++ extension ``cascade_clip._C`` loaded (and why
not), and ``cascade_clip.ops.available_backends()``. open_clip is only looked up in the package metadata, never
imported, so this stays fast.
"""

from __future__ import annotations

import importlib.metadata
import platform
import warnings
from typing import List, Tuple


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or "unknown"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> List[Tuple[str, str]]:
    """``(label, value)`` rows of the report."""
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # triton is optional at runtime; report any failure to import it
        rows.append(("triton", f"unavailable ({type(exc).__name__}: {exc})"))
    cuda = torch.version.cuda or "none (CPU-only torch build)"
    rows.append(("CUDA (torch build)", cuda))
    rows.append(("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))
    rows.append(("open_clip", _version("open_clip_torch")))
    rows.append(("CPU", f"{cpu_name()} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"))

    from . import _cpp_backend
    from .ops import available_backends, get_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reason is printed below instead
        loaded, reason = _cpp_backend.status()
        backends = available_backends()
    if loaded:
        rows.append(("cascade_clip._C", f"loaded (built for torch {_cpp_backend.extension_torch_version()})"))
    else:
        rows.append(("cascade_clip._C", f"not loaded: {reason}"))
    rows.append(("ops backends available", ", ".join(backends)))
    rows.append(("ops default backend", get_backend()))
    return rows


def main(argv=None) -> None:
    import argparse

    argparse.ArgumentParser(prog="cascade-clip info", description="versions, the C++ extension, ops backends").parse_args(argv)
    rows = collect()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}} : {value}")


if __name__ == "__main__":
    main()
