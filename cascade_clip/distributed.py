"""Process-group setup for runs launched by ``torchrun`` (or plain ``python``: one process, no group).

NCCL when the process has a CUDA device, gloo on CPU. Each rank uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; pick this rank's device (``auto``: CUDA if present)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in a single process)."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``module`` under DDP without the per-forward buffer broadcast: every rank builds the same model from the same
    seed, and training updates no buffer (CascadeCLIP registers none; the CLIP tower is frozen).

    torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers`` and warns on the old name; the new one leaves
    buffers in DDP's broadcast at construction, which, the buffers being equal on every rank, changes nothing."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        no_forward_sync = {"forward_sync_buffers": False}
    else:
        no_forward_sync = {"broadcast_buffers": False}
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_sync)
