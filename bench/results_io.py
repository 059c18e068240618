"""Where a benchmark row comes from and where it goes: the commit it measured, and the append to a results CSV.

``CASCADE_CLIP_COMMIT`` wins over git: a device machine gets a copy of the working tree whose ``.git`` may be stale
(the first H200 runs reported a HEAD older than the tree they ran), so a GPU run is started as
``CASCADE_CLIP_COMMIT=<sha> bash bench/gpu_check.sh $OUT``. A tree with uncommitted changes is marked ``-dirty``.
"""

from __future__ import annotations

import csv
import os
import subprocess
from typing import Dict, Iterable, Sequence

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


def append_rows(path: str, fields: Sequence[str], rows: Iterable[Dict[str, object]]) -> None:
    """Append ``rows`` to the CSV ``path``, writing the header only when the file is new or empty. Earlier rows are
    never rewritten: a file with other columns is refused (ValueError naming both) instead of mixed."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != list(fields):
            raise ValueError(f"{path} has the columns {header}, these rows have {list(fields)}; write to another file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
