"""Which code a benchmark row measured: the commit, for every results CSV in bench/.

``CASCADE_CLIP_COMMIT`` wins over git: a device machine gets a copy of the working tree whose ``.git`` may be stale
(the first H200 runs reported a HEAD older than the tree they ran), so a GPU run is started as
``CASCADE_CLIP_COMMIT=<sha> bash bench/gpu_check.sh $OUT``. A tree with uncommitted changes is marked ``-dirty``.
"""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_VAR = "CASCADE_CLIP_COMMIT"


def git_commit() -> str:
    """Short commit of the measured tree: ``$CASCADE_CLIP_COMMIT`` if set, else git's HEAD (``-dirty`` when the
    tracked files differ from it), else ``"unknown"``."""
    pinned = os.environ.get(ENV_VAR, "").strip()
    if pinned:
        return pinned
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if head and dirty else (head or "unknown")
