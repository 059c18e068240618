"""Metric code against hand-computed confusion matrices."""

import math

import pytest
import torch

from cascade_clip.metrics import compute_metrics, update_confusion


def test_confusion_matrix_from_pixels():
    label = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    cm = torch.zeros(3, 3, dtype=torch.int64)
    update_confusion(cm, pred, label)
    # rows = ground truth, columns = prediction; the 255 pixel is skipped
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="differ in size"):
        update_confusion(cm, pred[:1], label)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 3\)"):
        update_confusion(cm, pred, torch.full_like(label, 7))


def test_metrics_by_hand():
    cm = torch.tensor([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    m = compute_metrics(cm, ["a", "b", "c"], seen=[0, 1])
    # IoU = TP / (row + col - TP): a 1/(2+3-1)=25%, b 2/(3+3-2)=50%, c 1/(2+1-1)=50%
    assert m.iou == pytest.approx([25.0, 50.0, 50.0])
    assert m.mIoU == pytest.approx(125 / 3)
    assert m.mIoU_seen == pytest.approx(37.5)
    assert m.mIoU_unseen == pytest.approx(50.0)
    assert m.hIoU == pytest.approx(2 * 37.5 * 50 / 87.5)
    assert m.aAcc == pytest.approx(4 / 7 * 100)
    assert m.acc == pytest.approx([50.0, 200 / 3, 50.0])
    d = m.to_dict()
    assert set(d) >= {"mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "aAcc", "per_class"}
    assert d["per_class"] == {"a": 25.0, "b": 50.0, "c": 50.0}
    assert "mIoU(seen)" in m.table([0, 1])


def test_absent_class_is_nan_and_left_out_of_means():
    # class 2 neither in the ground truth nor predicted: IoU NaN, excluded (mmseg nanmean); class 1 predicted
    # but absent from the ground truth: IoU 0, included.
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    m = compute_metrics(cm, ["a", "b", "c"], seen=[0, 1, 2])
    assert m.iou[0] == pytest.approx(75.0) and m.iou[1] == 0.0 and math.isnan(m.iou[2])
    assert m.mIoU == pytest.approx(37.5)
    assert math.isnan(m.mIoU_unseen) and math.isnan(m.hIoU)
    assert m.to_dict()["mIoU_unseen"] is None and m.to_dict()["per_class"]["c"] is None
