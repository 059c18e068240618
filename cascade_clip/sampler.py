"""The training data stream: a ``DistributedSampler`` (``set_epoch`` each epoch) that can start mid-epoch and tags
each index with its augmentation seed, and an endless iterator of batches that a resumed run re-enters exactly.

A sample's augmentation is fixed by (seed, epoch, index) (:func:`cascade_clip.datasets.sample_seed`), and the epoch's
order by (seed, epoch), so the batches after a resume are those the uninterrupted run would have drawn, whatever the
number of loader workers.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .datasets import sample_seed


class SeededDistributedSampler(DistributedSampler):
    """Yields ``(index, augmentation seed)``; ``skip`` drops that many of this rank's first indices (once)."""

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def collate_train(samples):
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


class BatchStream:
    """Endless (images, labels) batches of ``batch_size`` per rank, starting after ``consumed`` micro-batches."""

    def __init__(self, dataset, *, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int, consumed: int = 0, pin_memory: bool = False):
        self.sampler = SeededDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(dataset)} images: fewer than one batch of {batch_size} per process "
                f"across {world_size} process(es)"
            )
        self.batch_size = batch_size
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=collate_train,
            pin_memory=pin_memory,
            # Kept across epochs: a new epoch otherwise starts every worker process again and waits for their first
            # batches, a stall per epoch that short epochs (a small dataset) pay often. Safe for exact resumption: a
            # sample's augmentation comes from its own seed, not from a worker's RNG.
            persistent_workers=num_workers > 0,
            # A private generator: creating loader iterators must not draw from the global RNG (dropout), or a
            # resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )
        self.epoch, offset = divmod(consumed, self.batches_per_epoch)
        self._offset = offset
        self._iterator = None

    def _start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self._offset * self.batch_size
        self._offset = 0
        self._iterator = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            return next(self._iterator)
