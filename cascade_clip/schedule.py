"""The optimiser (AdamW) and the official learning-rate schedule (mmcv PolyLrUpdaterHook with linear warm-up, as a
LambdaLR factor).

lr(it) = (lr0 - min_lr) * (1 - it / max_iters) ** power + min_lr, and for it < warmup_iters it is multiplied by
1 - (1 - it / warmup_iters) * (1 - warmup_ratio); ``it`` is the 0-based iteration, set before each iteration.
"""

from __future__ import annotations

from typing import Iterable

import torch

# optim.implementation -> torch.optim.AdamW keyword: its three implementations of the same update
ADAMW_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg) -> torch.optim.AdamW:
    """AdamW with the official values over ``params`` (one group: the official groups are all lr 2e-4, wd 0.01).

    ``optim_cfg.implementation`` picks torch's kernel: ``fused`` (default; one kernel per device and dtype for the
    whole update, on CUDA and CPU), ``foreach`` (multi-tensor kernels) or ``for-loop`` (per parameter, what mmcv 1.5
    ran). The same update; they differ in float rounding only. The fused kernel matters most where the step is
    host-bound: the for-loop update issues ~10 operators per parameter tensor (1224 calls per step on the CPU for the
    VOC model; bench/step_ops.py).
    """
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, **adamw_flags(optim_cfg))


def adamw_flags(optim_cfg) -> dict:
    """torch.optim.AdamW's ``fused`` and ``foreach`` for ``optim_cfg.implementation`` (both keys, always)."""
    if optim_cfg.implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation must be one of {', '.join(ADAMW_IMPLEMENTATIONS)}, "
                         f"got {optim_cfg.implementation!r}")
    return {"fused": None, "foreach": None, **ADAMW_IMPLEMENTATIONS[optim_cfg.implementation]}


def load_optimizer_state(optimizer: torch.optim.AdamW, state: dict, optim_cfg) -> None:
    """Resume ``optimizer`` from a checkpoint's ``state`` with the configured implementation.

    An optimiser state dict carries its ``fused``/``foreach`` flags in its parameter groups, and ``load_state_dict``
    would restore them: a for-loop checkpoint (or one from before ``optim.implementation`` existed) would keep
    running the for-loop kernel under a fused configuration, and GradScaler, which checks the optimiser it was built
    with, would hand that kernel fused-only arguments (fp16 runs fail on their first step). The moments and step
    counts are the same in every implementation; only the flags are replaced.
    """
    flags = adamw_flags(optim_cfg)
    state = {**state, "param_groups": [{**group, **flags} for group in state["param_groups"]]}
    optimizer.load_state_dict(state)


class PolyWarmup:
    """Multiplicative factor of the base lr at iteration ``it`` (a picklable callable for ``LambdaLR``)."""

    def __init__(self, base_lr: float, max_iters: int, *, power: float, min_lr: float, warmup_iters: int, warmup_ratio: float):
        self.base_lr, self.max_iters, self.power = base_lr, max_iters, power
        self.min_lr, self.warmup_iters, self.warmup_ratio = min_lr, warmup_iters, warmup_ratio

    def lr(self, it: int) -> float:
        progress = min(it, self.max_iters) / self.max_iters
        lr = (self.base_lr - self.min_lr) * (1 - progress) ** self.power + self.min_lr
        if it < self.warmup_iters:
            lr *= 1 - (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
        return lr

    def __call__(self, it: int) -> float:
        return self.lr(it) / self.base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = PolyWarmup(
        optim_cfg.lr, max_iters, power=optim_cfg.power, min_lr=optim_cfg.min_lr,
        warmup_iters=optim_cfg.warmup_iters, warmup_ratio=optim_cfg.warmup_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
