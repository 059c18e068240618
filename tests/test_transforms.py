"""The official training pipeline on torchvision.transforms.v2: sizes, pad values, flip, cat_max_ratio, determinism."""

import torch

from cascade_clip.transforms import TrainTransform, eval_resize, photometric_distortion, random_crop, rescale_size


def _pair(h=40, w=60):
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 4, (h, w), dtype=torch.uint8, generator=g)
    return image, label


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # short side binds
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds


def test_output_shapes_pad_and_determinism():
    image, label = _pair()
    t = TrainTransform(crop=32, scale=(128, 32), ratio_range=(0.5, 0.5))  # rescale to short side 16 -> padding
    out_img, out_lab = t(image, label, torch.Generator().manual_seed(0))
    assert out_img.shape == (3, 32, 32) and out_img.dtype == torch.float32
    assert out_lab.shape == (32, 32) and out_lab.dtype == torch.int64
    assert (out_lab[16:] == 255).all() and (out_img[:, 16:] == 0).all()  # label pad 255, image pad 0 (normalised)
    again = t(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(out_img, again[0]) and torch.equal(out_lab, again[1])
    other = t(image, label, torch.Generator().manual_seed(5))
    assert not torch.equal(out_img, other[0])


def test_flip_moves_image_and_mask_together():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, :8] = 255
    label = torch.zeros(32, 32, dtype=torch.uint8)
    label[:, :8] = 1
    t = TrainTransform(crop=32, scale=(32, 32), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False, cat_max_ratio=1.0)
    out_img, out_lab = t(image, label, torch.Generator().manual_seed(0))
    assert (out_lab[:, -8:] == 1).all() and (out_lab[:, :-8] == 0).all()
    assert (out_img[0, :, -8:] > out_img[0, :, :-8].max()).all()


def test_cat_max_ratio_redraws_crops():
    # Left 3/4 is class 0, right quarter class 1: a 16-wide crop of a 64-wide image is usually single-class.
    image = torch.zeros(3, 16, 64, dtype=torch.uint8)
    label = torch.zeros(16, 64, dtype=torch.uint8)
    label[:, 48:] = 1
    mixed = 0
    for seed in range(20):
        _, crop = random_crop(image, label, torch.Generator().manual_seed(seed), 16, 0.75)
        counts = torch.bincount(crop.flatten().long(), minlength=2)
        mixed += int((counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75)
    assert mixed >= 15  # redraws find the boundary almost always; without them ~1 in 49 positions qualifies


def test_photometric_keeps_uint8_range_and_eval_resize():
    image, _ = _pair()
    out = photometric_distortion(image, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == image.shape
    batch = eval_resize(image.unsqueeze(0), 20)
    assert batch.shape == (1, 3, 20, 30)
