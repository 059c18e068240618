"""The official learning-rate schedule (mmcv PolyLrUpdaterHook with linear warm-up), as a LambdaLR factor.

lr(it) = (lr0 - min_lr) * (1 - it / max_iters) ** power + min_lr, and for it < warmup_iters it is multiplied by
1 - (1 - it / warmup_iters) * (1 - warmup_ratio); ``it`` is the 0-based iteration, set before each iteration.
"""

from __future__ import annotations

import torch


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
