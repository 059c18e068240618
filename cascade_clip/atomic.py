"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

Every file this package writes for the user (checkpoints, embeddings, configs, metrics, prediction PNGs, JSON reports)
goes through :func:`atomic_write`, so a crash, a full disk or a kill leaves the previous file or none, never half of
one. The temporary name starts with ``.tmp-`` (hidden; ``train`` removes leftovers of a killed run from its work dir)
and is unique per process; it is created with the default permissions, like the file it replaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator, Optional

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, fsync: bool = False, encoding: Optional[str] = None) -> Iterator[IO]:
    """Yield a file open for writing (``mode`` "wb" or "w"); on a clean exit it replaces ``path``, on an exception it
    is removed. ``fsync``: flush it to the disk before the rename (checkpoints: the rename must not outlive the data
    after a power loss)."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}")
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
