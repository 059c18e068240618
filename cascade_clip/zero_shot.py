"""Zero-shot label handling of the official training glue (MODEL_SPEC.md sections 6.1-6.3).

Inductive: unseen-class pixels become ignore (255) and seen labels are re-indexed to their position in the seen list
(identity for VOC, a real remap for Context and COCO, whose seen sets are not contiguous); only the seen text rows are
used. Transductive (self-training): all text rows, seen labels kept as they are, and every unseen-class pixel gets a
pseudo-label, the argmax of the sigmoid scores over the unseen channels (no confidence threshold).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .catalog import IGNORE_INDEX

_UNLABELLED = -1  # table entry for labels the model must not see as such (official: -1)


def _check_seen(seen: Sequence[int], num_classes: int) -> list:
    seen = [int(i) for i in seen]
    if not seen:
        raise ValueError("the seen class list is empty")
    if len(set(seen)) != len(seen):
        raise ValueError(f"duplicate seen class indices: {seen}")
    if min(seen) < 0 or max(seen) >= num_classes:
        raise ValueError(f"seen indices {seen} out of range for {num_classes} classes")
    return seen


def inductive_table(seen: Sequence[int], num_classes: int) -> torch.Tensor:
    """256-entry lookup: seen class ``seen[i]`` -> i, 255 -> 255, every other value -> 255 (official ``_visiable_mask``,
    whose -1 entries the head turns into 255)."""
    seen = _check_seen(seen, num_classes)
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    table[torch.tensor(seen)] = torch.arange(len(seen))
    return table


def transductive_table(seen: Sequence[int], num_classes: int) -> torch.Tensor:
    """256-entry lookup: seen n -> n, 255 -> 255, unseen (and every other value) -> -1, i.e. "needs a pseudo-label".

    The official table also maps 200 -> 200, a pad value no config uses (MODEL_SPEC.md section 7, item 12); a 200
    here would be out of range for the loss anyway, so it is treated like any other non-class value.
    """
    seen = _check_seen(seen, num_classes)
    table = torch.full((256,), _UNLABELLED, dtype=torch.long)
    table[torch.tensor(seen)] = torch.tensor(seen)
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def apply_table(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """labels (any shape, values 0..255) -> table[labels] as int64."""
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise ValueError(f"labels must be in 0..255, got range [{int(labels.min())}, {int(labels.max())}]")
    return table.to(labels.device)[labels]


def inductive_labels(labels: torch.Tensor, seen: Sequence[int], num_classes: int) -> torch.Tensor:
    """Dataset labels (0..K-1, 255) -> training labels over the seen classes only (0..len(seen)-1, 255)."""
    return apply_table(labels, inductive_table(seen, num_classes))


@torch.no_grad()
def transductive_labels(
    labels: torch.Tensor, mask_logits: torch.Tensor, seen: Sequence[int]
) -> torch.Tensor:
    """Dataset labels (B, H, W) and the model's logits over all C classes (B, C, H, W) -> labels with pseudo-labels.

    Seen labels and 255 are kept; each unseen-class pixel gets argmax over the unseen channels of sigmoid(logits)
    (seen channels are set to -1 first, as officially, so they never win).
    """
    num_classes = mask_logits.shape[1]
    if mask_logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"mask logits {tuple(mask_logits.shape)} and labels {tuple(labels.shape)} must share H and W"
        )
    mapped = apply_table(labels, transductive_table(seen, num_classes))
    return _with_pseudo_labels(mapped, mask_logits, torch.tensor([int(i) for i in seen], device=mask_logits.device))


@torch.no_grad()
def _with_pseudo_labels(mapped: torch.Tensor, mask_logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Transductive-table labels with every unlabelled pixel set to the argmax of sigmoid(logits) over the unseen
    channels (``seen``, an index tensor on the logits' device, are set to -1 first, as officially, so they never win)."""
    scores = torch.sigmoid(mask_logits.detach().float())
    scores[:, seen] = -1.0
    return torch.where(mapped == _UNLABELLED, scores.argmax(dim=1), mapped)


class TrainingLabels:
    """Dataset labels -> the labels one training run uses, with the tables on ``device`` built once.

    ``labels(batch)`` is :func:`inductive_labels` (inductive runs) and ``labels(batch, mask_logits)`` is
    :func:`transductive_labels` (self-training), the same values, for the training loop: no table is rebuilt and
    copied to the device per step, and no range check reads values back from the GPU (each a host-device sync in a
    host-bound step). The batches must be what the datasets give: class indices read from 8-bit masks (0..255),
    checked against the dataset's classes when read; other values are not checked here (a negative one would wrap).
    """

    def __init__(self, seen: Sequence[int], num_classes: int, *, transductive: bool, device: torch.device):
        self.transductive = transductive
        table = (transductive_table if transductive else inductive_table)(seen, num_classes)
        self.table = table.to(device)
        self.seen = torch.tensor([int(i) for i in seen], device=device)

    def __call__(self, labels: torch.Tensor, mask_logits: "torch.Tensor | None" = None) -> torch.Tensor:
        mapped = self.table[labels.long()]
        if not self.transductive:
            return mapped
        if mask_logits is None:
            raise ValueError("transductive training labels need the model's mask logits for the pseudo-labels")
        if mask_logits.dim() != 4 or mask_logits.shape[0] != labels.shape[0] or mask_logits.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"mask logits {tuple(mask_logits.shape)} and labels {tuple(labels.shape)} must be "
                             "(B, C, H, W) and (B, H, W)")
        return _with_pseudo_labels(mapped, mask_logits, self.seen)


def training_text(text: torch.Tensor, seen: Sequence[int], transductive: bool) -> torch.Tensor:
    """Text rows the model trains against: the seen rows (inductive) or all rows (transductive)."""
    if transductive:
        return text
    return text[torch.tensor([int(i) for i in seen], device=text.device)]
