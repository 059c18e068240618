"""Gradient accumulation that computes the gradient of one large batch, with the official loss normalisation.

The official loss divides its sums by the number of (image, present class) pairs, averaged over the DDP ranks and
clamped to >= 1 (:func:`cascade_clip.loss.segmentation_loss`). On ``G`` GPUs, after DDP averages the gradients, a
step's gradient is therefore ``sum of the pair sums' gradients / max(N, G)``, with ``N`` the pairs of the whole batch.
Dividing each micro-batch by its own count instead (and by the number of micro-batches) weighs images by how many
classes their micro-batch happens to hold, so ``grad_accum=4`` on one GPU would not reproduce the paper's 4 GPUs.

Here ``k`` micro-batches on ``W`` processes give the gradient of ``G = W * k`` GPUs: every micro-batch's sums are
divided by the divisor of all micro-batches so far, ``M_k = max(N_k / W, k)`` (``N_k`` their pairs on every rank),
and before micro-batch ``k`` joins, the gradients accumulated so far are rescaled by ``M_{k-1} / M_k``. The counts of
transductive micro-batches depend on their own forward pass (pseudo-labels), which is why the divisor is settled one
micro-batch at a time instead of before the first. With one micro-batch this is the official normalisation exactly.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist


class AccumulatedNormalizer:
    """Divisors for the micro-batches of one optimizer step; :meth:`reset` before each step."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.pairs: Optional[torch.Tensor] = None  # present (image, class) pairs so far, summed over ranks
        self.divisor: Optional[torch.Tensor] = None

    def add(self, local_pairs: torch.Tensor, grads: Iterable[Optional[torch.Tensor]] = ()) -> torch.Tensor:
        """Count a micro-batch (``local_pairs`` on this rank, a float32 scalar tensor), rescale the ``grads``
        accumulated by the earlier ones to the new divisor, and return the divisor of this micro-batch's sums.

        Stays on the device (no host sync); under DDP it all-reduces the count, so every rank must call it."""
        pairs = local_pairs.detach().to(torch.float32).clone()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(pairs)
        self.micro_batches += 1
        self.pairs = pairs if self.pairs is None else self.pairs + pairs
        divisor = torch.clamp(self.pairs / self.world_size, min=float(self.micro_batches))
        if self.divisor is not None:
            existing = [g for g in grads if g is not None]
            if existing:
                torch._foreach_mul_(existing, self.divisor / divisor)
        self.divisor = divisor
        return divisor
