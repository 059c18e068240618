"""``cascade-clip bench``: run one of the benchmark scripts of the source checkout's ``bench/`` folder.

    cascade-clip bench kernels --out DIR        # bench/bench_gpu.py: eager / torch.compile / Triton, on a GPU
    cascade-clip bench kernels --dry-run --out DIR   # the same plumbing on the CPU (interpreter, tiny shapes)
    cascade-clip bench cpu --out FILE.csv       # bench/bench_cpu.py: the C++ backend against eager and compile
    cascade-clip bench train --out FILE.csv     # bench/train_speed.py: whole-model training steps per backend
    cascade-clip bench pipeline --out DIR       # bench/pipeline_run.py: the VOC preset end to end
    cascade-clip bench host                     # bench/host_overhead.py: host time of the Triton call path
    cascade-clip bench steps                    # bench/step_ops.py: ATen calls per training step (host work)
    cascade-clip bench segment                  # bench/segment_speed.py: inference (segment) per block path

The scripts are not part of the installed package (they write results next to the code and need the repository), so
this works from an editable install of a clone (``make install``); the arguments after the benchmark's name go to the
script unchanged (``--help`` shows each one's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

SCRIPTS = {
    "kernels": "bench_gpu.py",
    "cpu": "bench_cpu.py",
    "train": "train_speed.py",
    "pipeline": "pipeline_run.py",
    "host": "host_overhead.py",
    "steps": "step_ops.py",
    "segment": "segment_speed.py",
}


def bench_dir() -> Optional[str]:
    """The checkout's ``bench/`` folder beside the package, or None for an install without the repository."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench")
    return path if os.path.isfile(os.path.join(path, SCRIPTS["kernels"])) else None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: cascade-clip bench {{{','.join(SCRIPTS)}}} [ARGS...]\n\n{__doc__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SCRIPTS:
        raise SystemExit(f"cascade-clip bench: unknown benchmark {name!r}; choose one of {', '.join(SCRIPTS)}")
    folder = bench_dir()
    if folder is None:
        raise SystemExit("cascade-clip bench: the benchmarks live in the repository's bench/ folder, which this "
                         "installation does not have; install from a clone (pip install --no-build-isolation -e .)")
    script = os.path.join(folder, SCRIPTS[name])
    # a child process: the scripts set environment variables (TRITON_INTERPRET) before they import torch or Triton
    return subprocess.call([sys.executable, script, *rest])


if __name__ == "__main__":
    sys.exit(main())
