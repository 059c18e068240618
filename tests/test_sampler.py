"""The training data stream (cascade_clip.sampler.BatchStream) with loader workers: workers live across epochs, and a
stream started mid-run yields the batches the uninterrupted stream yields there."""

import os

import torch

from cascade_clip.sampler import BatchStream

NUM_IMAGES, BATCH = 12, 4  # three batches per epoch


class _IndexDataset(torch.utils.data.Dataset):
    """Sample ``i``: an image holding ``i`` and its augmentation seed, a label holding the worker's process id."""

    def __len__(self):
        return NUM_IMAGES

    def __getitem__(self, key):
        index, seed = key
        return {"image": torch.tensor([index, seed], dtype=torch.int64),
                "label": torch.tensor([os.getpid()], dtype=torch.int64)}


def _stream(consumed=0):
    return BatchStream(_IndexDataset(), batch_size=BATCH, rank=0, world_size=1, seed=3, num_workers=2,
                       consumed=consumed)


def test_workers_live_across_epochs():
    stream = _stream()
    pids_per_epoch = []
    for _ in range(4):  # four epochs
        pids = set()
        for _ in range(NUM_IMAGES // BATCH):
            _, labels = next(stream)
            pids.update(labels.flatten().tolist())
        pids_per_epoch.append(pids)
    assert stream.epoch == 3
    assert all(os.getpid() not in pids for pids in pids_per_epoch)  # loaded by workers, not this process
    # a loader that starts its workers again each epoch gives every epoch new process ids
    assert all(pids == pids_per_epoch[0] for pids in pids_per_epoch), pids_per_epoch


def test_stream_started_mid_run_continues_the_uninterrupted_one():
    whole = _stream()
    batches = [next(whole)[0] for _ in range(8)]  # 2 epochs and 2 batches
    for consumed in (2, 3, 5):
        resumed = _stream(consumed=consumed)
        for expected in batches[consumed:]:
            assert torch.equal(next(resumed)[0], expected)
    # and the epochs differ (order and seeds), so the comparison above can tell them apart
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:6]))
