"""Dataset readers on tiny files written here, in each official layout, and the zero-shot label remaps."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_clip.catalog import dataset_info
from cascade_clip.datasets import build_dataset, list_samples, read_mask, reduce_zero_label
from cascade_clip.synthetic import voc_palette
from cascade_clip.zero_shot import inductive_labels, training_text, transductive_labels


def _write_image(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _write_palette_mask(path, label):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette([c for rgb in voc_palette() for c in rgb])
    image.save(path)


def _write_split(path, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(names) + "\n")


@pytest.fixture
def voc_root(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    label = np.zeros((6, 8), dtype=np.uint8)
    label[:, 4:] = 15  # class index 15 -> 14 after reduce_zero_label
    label[0, 0] = 255  # void boundary
    for name in ("a", "b"):
        _write_image(str(base / "JPEGImages" / f"{name}.jpg"), 6, 8)
    _write_palette_mask(str(base / "SegmentationClass" / "a.png"), label)
    aug = label.copy()
    aug[:, :2] = 20
    _write_palette_mask(str(base / "SegmentationClassAug" / "b.png"), aug)
    _write_split(str(base / "ImageSets/Segmentation/train.txt"), ["a"])
    _write_split(str(base / "ImageSets/Segmentation/aug.txt"), ["b"])
    _write_split(str(base / "ImageSets/Segmentation/val.txt"), ["a"])
    return tmp_path


def test_voc_without_segmentation_class_aug_says_how_to_train(voc_root):
    os.unlink(voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/aug.txt")
    with pytest.raises(ValueError, match=r"aug.txt.*--set data.train_split=train"):
        build_dataset("voc", str(voc_root), "train+aug", num_classes=20)


def test_voc_palette_indices_and_reduce_zero_label(voc_root):
    data = build_dataset("voc", str(voc_root), "train", num_classes=20)
    sample = data[0]
    assert sample["name"] == "a" and sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 6, 8)
    label = sample["label"]
    assert label[1, 0] == 255 and label[0, 0] == 255  # background and void -> ignore
    assert (label[:, 4:] == 14).all()  # palette index 15 (not its RGB colour) -> class 14


def test_voc_train_plus_aug_reads_segmentationclassaug(voc_root):
    data = build_dataset("voc", str(voc_root), "train+aug", num_classes=20)
    assert [s.name for s in data.samples] == ["a", "b"]
    assert "SegmentationClassAug" in data.samples[1].mask
    assert (data[1]["label"][:, :2] == 19).all()
    # the layout root itself is accepted as --data-root too
    assert len(list_samples("voc", str(voc_root / "VOCdevkit" / "VOC2012"), "val")) == 1


def test_context_layout(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    _write_image(str(base / "JPEGImages" / "2008_000002.jpg"), 5, 7)
    label = np.full((5, 7), 59, dtype=np.uint8)
    label[0] = 0
    os.makedirs(base / "SegmentationClassContext")
    Image.fromarray(label, mode="L").save(str(base / "SegmentationClassContext" / "2008_000002.png"))
    _write_split(str(base / "ImageSets/SegmentationContext/val.txt"), ["2008_000002"])
    data = build_dataset("context", str(tmp_path), "val", num_classes=59)
    label = data[0]["label"]
    assert (label[0] == 255).all() and (label[1:] == 58).all()


@pytest.fixture
def coco_root(tmp_path):
    base = tmp_path / "coco_stuff164k"
    info = dataset_info("coco")
    label = np.array([[0, 19, 23, 255], [170, 1, 19, 5]], dtype=np.uint8)
    _write_image(str(base / "images/val2017/000000000139.jpg"), 2, 4)
    os.makedirs(base / "annotations/val2017")
    Image.fromarray(label, mode="L").save(str(base / "annotations/val2017/000000000139_labelTrainIds.png"))
    return tmp_path, info, label


def test_coco_layout_lists_folder_and_keeps_labels(coco_root):
    root, info, label = coco_root
    data = build_dataset("coco", str(root), "val", num_classes=len(info.classes))
    assert data.samples[0].name == "000000000139"
    assert torch.equal(data[0]["label"], torch.from_numpy(label).long())  # no reduce_zero_label for COCO


def test_coco_non_contiguous_seen_remap(coco_root):
    _, info, label = coco_root
    assert 19 in info.unseen and 23 in info.unseen and 170 in info.seen
    remapped = inductive_labels(torch.from_numpy(label), info.seen, len(info.classes))
    position = {c: i for i, c in enumerate(info.seen)}
    expected = [[position[0], 255, 255, 255], [position[170], position[1], 255, position[5]]]
    assert remapped.tolist() == expected
    assert position[170] == len(info.seen) - 1 and position[5] == 5 and position[20] == 19  # 19 skipped


def test_transductive_pseudo_labels_pick_unseen_argmax():
    seen = (0, 2)
    labels = torch.tensor([[[0, 1, 3, 255]]])  # 1 and 3 are unseen
    logits = torch.full((1, 4, 1, 4), -5.0)
    logits[0, 0] = 9.0  # a seen class scoring highest never wins a pseudo-label
    logits[0, 3, 0, 1] = 1.0  # pixel 1: unseen 3 beats unseen 1
    logits[0, 1, 0, 2] = 0.5  # pixel 2: unseen 1 beats unseen 3
    out = transductive_labels(labels, logits, seen)
    assert out.tolist() == [[[0, 3, 1, 255]]]
    text = torch.randn(4, 8)
    assert training_text(text, seen, transductive=False).shape == (2, 8)
    assert training_text(text, seen, transductive=True) is text


def test_missing_root_and_split(tmp_path, voc_root):
    with pytest.raises(ValueError, match="data root not found"):
        list_samples("voc", str(tmp_path / "nope"), "train")
    os.unlink(voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt")
    with pytest.raises(ValueError, match="split file not found: .*val.txt"):
        list_samples("voc", str(voc_root), "val")
    with pytest.raises(ValueError, match="unknown split"):
        list_samples("voc", str(voc_root), "test")


def test_image_without_mask(voc_root):
    os.unlink(voc_root / "VOCdevkit/VOC2012/SegmentationClass/a.png")
    with pytest.raises(ValueError, match=r"a\.jpg has no mask: .*SegmentationClass/a\.png"):
        list_samples("voc", str(voc_root), "train")


def test_mask_size_mismatch(voc_root):
    _write_palette_mask(str(voc_root / "VOCdevkit/VOC2012/SegmentationClass/a.png"), np.zeros((5, 8), np.uint8))
    data = build_dataset("voc", str(voc_root), "train", num_classes=20)
    with pytest.raises(ValueError, match=r"a\.png: mask size 8x5 .*differs from its image .*a\.jpg \(8x6\)"):
        data[0]


def test_corrupt_files(voc_root):
    (voc_root / "VOCdevkit/VOC2012/JPEGImages/a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    data = build_dataset("voc", str(voc_root), "train", num_classes=20)
    with pytest.raises(ValueError, match=r"a\.jpg: cannot read as an image"):
        data[0]
    (voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/b.png").write_bytes(b"garbage")
    data = build_dataset("voc", str(voc_root), "aug", num_classes=20)
    with pytest.raises(ValueError, match=r"b\.png: cannot read as a mask"):
        data[0]


def test_mask_values_outside_classes(voc_root):
    bad = np.zeros((6, 8), np.uint8)
    bad[2, 2] = 21  # VOC has 20 classes + background 0 (+ 255)
    _write_palette_mask(str(voc_root / "VOCdevkit/VOC2012/SegmentationClass/a.png"), bad)
    data = build_dataset("voc", str(voc_root), "train", num_classes=20)
    with pytest.raises(ValueError, match=r"a\.png: mask values \[21\] are outside the dataset's 20 classes and 255"):
        data[0]


def test_rgb_mask_rejected(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        read_mask(str(path))
    assert reduce_zero_label(np.array([0, 1, 255, 20], np.uint8)).tolist() == [255, 0, 255, 19]


def test_one_bit_mask_reads_as_zero_one(tmp_path):
    """A 1-bit PNG (PIL mode '1') holds classes 0 and 1, as mmseg's Pillow decoding reads it."""
    path = tmp_path / "m.png"
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(bits).save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    mask = read_mask(str(path))
    assert mask.dtype == np.uint8 and mask.tolist() == bits.astype(np.uint8).tolist()


@pytest.mark.parametrize("transductive", [False, True])
def test_training_labels_equal_the_per_call_label_maps(transductive):
    """zero_shot.TrainingLabels (the training loop's label map, tables built once) = inductive_labels /
    transductive_labels, on COCO's non-contiguous seen set with every label value 0..255."""
    from cascade_clip.catalog import dataset_info
    from cascade_clip.zero_shot import TrainingLabels

    info = dataset_info("coco")
    num_classes = len(info.classes)
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(256), torch.randint(0, num_classes, (256,), generator=gen)]).view(2, 16, 16)
    labels[labels >= num_classes] = 255  # what a dataset yields: its classes or 255
    labels = labels.to(torch.uint8).long()
    logits = torch.randn(2, num_classes, 16, 16, generator=gen)
    mapper = TrainingLabels(info.seen, num_classes, transductive=transductive, device=torch.device("cpu"))
    if transductive:
        expected = transductive_labels(labels, logits, info.seen)
        assert torch.equal(mapper(labels, logits), expected)
        with pytest.raises(ValueError, match="need the model's mask logits"):
            mapper(labels)
        with pytest.raises(ValueError, match=r"mask logits \(2, 171, 16, 8\) and labels \(2, 16, 16\)"):
            mapper(labels, logits[..., :8])
    else:
        expected = inductive_labels(labels, info.seen, num_classes)
        assert torch.equal(mapper(labels), expected)
        assert torch.equal(mapper(labels.to(torch.uint8)), expected)
    assert expected.dtype == torch.int64 and set(expected.unique().tolist()) - set(range(num_classes)) <= {255}
