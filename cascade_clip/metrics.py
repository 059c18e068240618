"""Segmentation metrics from a confusion matrix (mmseg's definitions), in percent.

The confusion matrix ``cm[gt, pred]`` is accumulated on the device with one ``bincount`` per image and summed across
DDP ranks. Per class, IoU = TP / (TP + FP + FN); a class whose union is empty (absent from the ground truth and never
predicted) has IoU NaN and is left out of the means, as mmseg's ``nanmean`` does. mIoU(seen) and mIoU(unseen) are
means over the seen / unseen classes; hIoU is their harmonic mean; aAcc is the pixel accuracy over labelled pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .catalog import IGNORE_INDEX


def update_confusion(cm: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
    """Add one prediction (H, W) against its label (H, W) to ``cm`` (C, C) in place; ignore pixels are skipped."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
    num_classes = cm.shape[0]
    keep = label != ignore_index
    gt = label[keep].long()
    pr = pred[keep].long()
    if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}, got {gt.unique().tolist()[:10]}")
    cm += torch.bincount(gt * num_classes + pr, minlength=num_classes * num_classes).view(num_classes, num_classes).to(cm.dtype)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class SegMetrics:
    """Metrics in percent; NaN where undefined (e.g. mIoU_unseen without unseen classes)."""

    class_names: List[str]
    iou: List[float]
    acc: List[float]
    mIoU: float
    mIoU_seen: float
    mIoU_unseen: float
    hIoU: float
    aAcc: float
    mAcc: float

    def to_dict(self) -> Dict:
        def clean(v: float) -> Optional[float]:
            return None if math.isnan(v) else round(float(v), 4)

        return {
            "mIoU": clean(self.mIoU),
            "mIoU_seen": clean(self.mIoU_seen),
            "mIoU_unseen": clean(self.mIoU_unseen),
            "hIoU": clean(self.hIoU),
            "aAcc": clean(self.aAcc),
            "mAcc": clean(self.mAcc),
            "per_class": {name: clean(v) for name, v in zip(self.class_names, self.iou)},
            "per_class_acc": {name: clean(v) for name, v in zip(self.class_names, self.acc)},
        }

    def table(self, seen: Sequence[int] = ()) -> str:
        """Per-class IoU / Acc and the summary as a plain-text table."""
        seen = set(int(i) for i in seen)
        width = max([len("class")] + [len(n) for n in self.class_names])

        def fmt(v: float) -> str:
            return "   nan" if math.isnan(v) else f"{v:6.2f}"

        lines = [f"{'class':<{width}}  split      IoU    Acc", "-" * (width + 24)]
        for i, name in enumerate(self.class_names):
            split = "seen" if i in seen else "unseen"
            lines.append(f"{name:<{width}}  {split:<6}  {fmt(self.iou[i])} {fmt(self.acc[i])}")
        lines.append("-" * (width + 24))
        lines.append(
            f"mIoU {fmt(self.mIoU)} | mIoU(seen) {fmt(self.mIoU_seen)} | mIoU(unseen) {fmt(self.mIoU_unseen)} | "
            f"hIoU {fmt(self.hIoU)} | aAcc {fmt(self.aAcc)} | mAcc {fmt(self.mAcc)}"
        )
        return "\n".join(lines)


def compute_metrics(cm: torch.Tensor, class_names: Sequence[str], seen: Sequence[int]) -> SegMetrics:
    """Metrics of a (C, C) confusion matrix ``cm[gt, pred]``; ``seen`` indexes the seen classes (the rest unseen)."""
    cm = cm.detach().double().cpu()
    num_classes = cm.shape[0]
    if cm.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(f"confusion matrix {tuple(cm.shape)} does not match {len(class_names)} class names")
    tp = cm.diag()
    gt = cm.sum(dim=1)
    pred = cm.sum(dim=0)
    union = gt + pred - tp
    iou = [float("nan") if u == 0 else float(t / u * 100) for t, u in zip(tp, union)]
    acc = [float("nan") if g == 0 else float(t / g * 100) for t, g in zip(tp, gt)]
    seen_set = set(int(i) for i in seen)
    m_seen = _nanmean([iou[i] for i in range(num_classes) if i in seen_set])
    m_unseen = _nanmean([iou[i] for i in range(num_classes) if i not in seen_set])
    if math.isnan(m_seen) or math.isnan(m_unseen):
        h = float("nan")
    elif m_seen + m_unseen == 0:
        h = 0.0
    else:
        h = 2 * m_seen * m_unseen / (m_seen + m_unseen)
    total = float(cm.sum())
    return SegMetrics(
        class_names=list(class_names),
        iou=iou,
        acc=acc,
        mIoU=_nanmean(iou),
        mIoU_seen=m_seen,
        mIoU_unseen=m_unseen,
        hIoU=h,
        aAcc=float(tp.sum() / total * 100) if total else float("nan"),
        mAcc=_nanmean(acc),
    )
