"""Training checkpoints: what a run needs to continue exactly, written atomically, and the checks on resume.

A checkpoint (this project's format, :mod:`cascade_clip.checkpoint`) holds the model, optimizer, scheduler, GradScaler,
iteration, every rank's RNG states, the resolved training config, and the class embeddings trained with. It is written
to ``WORK_DIR/iter_<N>.pt`` through a temporary file and ``os.replace``, then ``latest.pt`` is pointed at it by a hard
link renamed into place (a copy where links are unsupported): a killed run leaves only complete checkpoints (at worst
a hidden ``.tmp-*`` file, removed when the next run starts).
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .atomic import TMP_PREFIX
from .checkpoint import read_any_checkpoint, save_model_checkpoint

LATEST = "latest.pt"
# Keys that may change between a run and its resume without changing what is computed.
RESUME_MAY_DIFFER = {
    "data.root", "data.num_workers", "data.text_embeddings",
    "train.work_dir", "train.log_interval", "train.checkpoint_interval", "train.keep_checkpoints",
    "train.tensorboard", "train.kernels", "train.eval_at_end", "train.eval_at_start",
    "optim.implementation",  # the same AdamW update and optimiser state; only the kernel differs
    "model.clip_pretrained",  # where the CLIP file was: the checkpoint holds every weight (and the class embeddings)
}


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def clean_stale_temporaries(work_dir: str) -> List[str]:
    """Remove temporary files a killed run left in ``work_dir`` (never a complete checkpoint)."""
    removed = []
    for path in glob.glob(os.path.join(work_dir, TMP_PREFIX + "*")) + glob.glob(os.path.join(work_dir, ".latest-*")):
        os.unlink(path)
        removed.append(path)
    return removed


def _point_latest(work_dir: str, target: str) -> None:
    tmp = os.path.join(work_dir, f".latest-{os.getpid()}.pt")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, os.path.join(work_dir, LATEST))


def iteration_checkpoints(work_dir: str, up_to: Optional[int] = None) -> List[str]:
    """``iter_<N>.pt`` files of ``work_dir`` by increasing N (only N <= ``up_to`` when given)."""
    found = []
    for path in glob.glob(os.path.join(work_dir, "iter_*.pt")):
        match = re.fullmatch(r"iter_(\d+)\.pt", os.path.basename(path))
        if match and (up_to is None or int(match.group(1)) <= up_to):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def save_training_checkpoint(work_dir: str, iteration: int, model, *, keep: int = 0, **state: Any) -> str:
    """Write ``iter_<iteration>.pt`` and point ``latest.pt`` at it; keep the newest ``keep`` iter files (0 = all).

    Only files up to ``iteration`` count for ``keep``: ``iter_<N>.pt`` files of higher N are left by an earlier,
    longer run in the same folder, not this run's history, and must not push out the file just written."""
    path = os.path.join(work_dir, f"iter_{iteration}.pt")
    save_model_checkpoint(path, model, iteration=iteration, **state)
    _point_latest(work_dir, path)
    if keep > 0:
        for old in iteration_checkpoints(work_dir, up_to=iteration)[:-keep]:
            os.unlink(old)
    return path


def flatten(config: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def config_differences(stored: Dict, current: Dict) -> List[str]:
    """``key: stored -> current`` for every key that differs and may not differ on resume."""
    a, b = flatten(stored), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MAY_DIFFER or key.startswith("eval."):
            continue
        if _normalise(a.get(key)) != _normalise(b.get(key)):
            out.append(f"{key}: {a.get(key)!r} (checkpoint) vs {b.get(key)!r} (now)")
    return out


def read_resume_checkpoint(path: str, current_config: Dict) -> Dict[str, Any]:
    """The training checkpoint at ``path``, checked to be resumable with ``current_config``."""
    raw = read_any_checkpoint(path)
    if "official_state_dict" in raw or "optimizer" not in raw or "train_config" not in raw:
        raise ValueError(f"{path}: not a training checkpoint of this project (no optimizer state); use --load-from for weights only")
    diffs = config_differences(raw["train_config"], current_config)
    if diffs:
        raise ValueError(f"{path}: checkpoint was written with another configuration; cannot resume:\n  " + "\n  ".join(diffs))
    return raw


def resolve_resume(resume: Optional[str], work_dir: str) -> Optional[str]:
    """``--resume`` value -> checkpoint path: ``auto`` = WORK_DIR/latest.pt if it exists (else start fresh)."""
    if resume in (None, ""):
        return None
    if resume == "auto":
        path = os.path.join(work_dir, LATEST)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise ValueError(f"--resume: checkpoint not found: {resume}")
    return resume
