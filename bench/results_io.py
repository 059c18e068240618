"""Where a benchmark row comes from and where it goes: the commit it measured, the run it belongs to, and the append
to a results CSV.

``CASCADE_CLIP_COMMIT`` wins over git: a device machine gets a copy of the working tree whose ``.git`` may be stale
(the first H200 runs reported a HEAD older than the tree they ran), so a GPU run is started as
``CASCADE_CLIP_COMMIT=<sha> bash bench/gpu_check.sh $OUT``. A tree with uncommitted changes is marked ``-dirty``.

``CASCADE_CLIP_RUN_ID`` names one run: ``gpu_check.sh`` sets it once for its several benchmark invocations, so their
rows form one run; a manual invocation without it gets an id of its own process.
"""

from __future__ import annotations

import csv
import datetime
import os
import socket
import subprocess
from typing import Dict, Iterable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_VAR = "CASCADE_CLIP_COMMIT"
RUN_ENV_VAR = "CASCADE_CLIP_RUN_ID"
_process_run: Optional[str] = None


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


def run_id(now: Optional[datetime.datetime] = None) -> str:
    """``$CASCADE_CLIP_RUN_ID`` if set, else one id per process: its first call's UTC time, the host and the pid
    (the time alone would let two machines, or two processes started in the same second, share a run)."""
    global _process_run
    pinned = os.environ.get(RUN_ENV_VAR, "").strip()
    if pinned:
        return pinned
    if _process_run is None:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        _process_run = f"{now.strftime('%Y-%m-%dT%H:%M:%SZ')}-{socket.gethostname()}-{os.getpid()}"
    return _process_run


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
