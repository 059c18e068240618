"""The official training pipeline on torchvision.transforms.v2: sizes, pad values, flip, cat_max_ratio, determinism."""

import colorsys

import numpy as np
import pytest
import torch

from cascade_clip import transforms
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


# ---- PhotoMetricDistortion, branch by branch, against mmseg 0.24's formulas ----
# mmseg draws (numpy): randint(2) brightness [uniform(-32, 32)]; randint(2) mode; mode 1: randint(2) contrast
# [uniform(0.5, 1.5)]; randint(2) saturation [uniform(0.5, 1.5)]; randint(2) hue [randint(-18, 18)]; mode 0: contrast.


class _ScriptedDraws:
    """Replaces the module's draws with scripted values, in call order, and records each draw's range: every branch
    of photometric_distortion can be switched on or off, with known parameters."""

    def __init__(self, monkeypatch, ints, floats=()):
        self.ints, self.floats, self.calls = list(ints), list(floats), []
        monkeypatch.setattr(transforms, "_randint", self._randint)
        monkeypatch.setattr(transforms, "_uniform", self._uniform)

    def _randint(self, generator, low, high):
        self.calls.append(("randint", low, high))
        return self.ints.pop(0)

    def _uniform(self, generator, low, high):
        self.calls.append(("uniform", low, high))
        return self.floats.pop(0)

    def check_all_used(self):
        assert not self.ints and not self.floats, f"draws left unused: {self.ints} {self.floats}"


def _photo_image():
    """(3, 6, 8) uint8: random colours plus black, white, a grey (no saturation) and pure red."""
    g = torch.Generator().manual_seed(4)
    image = torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8, generator=g)
    image[:, 0, 0], image[:, 0, 1], image[:, 0, 2] = 0, 255, 128
    image[:, 0, 3] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    return image


def _mmseg_convert(image, alpha=1.0, beta=0.0):
    """mmseg's ``convert``: ``img.astype(np.float32) * alpha + beta``, clipped to [0, 255], cast to uint8."""
    return torch.from_numpy(np.clip(image.numpy().astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8))


def _per_pixel_hsv(image, change):
    """Apply ``change(h, s, v) -> (h, s, v)`` to every pixel in exact (float64) HSV; returns float64 RGB on 0..255."""
    rgb = image.double().permute(1, 2, 0).reshape(-1, 3).tolist()
    out = [colorsys.hsv_to_rgb(*change(*colorsys.rgb_to_hsv(*pixel))) for pixel in rgb]
    return torch.tensor(out, dtype=torch.float64).reshape(image.shape[1], image.shape[2], 3).permute(2, 0, 1)


def _mmseg_saturation(image, alpha):
    """mmseg's saturation step, ``S = clip(S * alpha)`` with hue and value kept, in exact HSV arithmetic (mmseg goes
    through OpenCV's uint8 HSV, which differs by rounding: cascade_clip.transforms documents it), truncated to uint8."""
    exact = _per_pixel_hsv(image, lambda h, s, v: (h, min(s * alpha, 1.0), v))
    return exact.clamp(0, 255).to(torch.uint8)


CONTRAST, SATURATION = 1.37, 0.61


@pytest.mark.parametrize("beta", [20.7, -25.3])
def test_photometric_brightness_adds_a_delta(monkeypatch, beta):
    image = _photo_image()
    draws = _ScriptedDraws(monkeypatch, ints=[1, 0, 0, 0, 0], floats=[beta])  # brightness on, mode 0, rest off
    out = photometric_distortion(image, torch.Generator())
    draws.check_all_used()
    assert draws.calls == [("randint", 0, 2), ("uniform", -32, 32), ("randint", 0, 2), ("randint", 0, 2),
                           ("randint", 0, 2), ("randint", 0, 2)]
    assert torch.equal(out, _mmseg_convert(image, beta=beta))
    assert (out == (255 if beta > 0 else 0)).any()  # clipped somewhere


@pytest.mark.parametrize("contrast_first", [True, False])
def test_photometric_contrast_multiplies_before_or_after_the_colour_steps(monkeypatch, contrast_first):
    image = _photo_image()
    ints = [0, 1, 1, 0, 0] if contrast_first else [0, 0, 0, 0, 1]  # brightness off, mode, then contrast on
    draws = _ScriptedDraws(monkeypatch, ints=ints, floats=[CONTRAST])
    out = photometric_distortion(image, torch.Generator())
    draws.check_all_used()
    assert ("uniform", 0.5, 1.5) in draws.calls
    assert torch.equal(out, _mmseg_convert(image, alpha=CONTRAST))


def test_photometric_saturation_scales_hsv_saturation(monkeypatch):
    image = _photo_image()
    for alpha in (SATURATION, 1.45):  # 1.45 saturates (S capped at 1) the already strong colours
        draws = _ScriptedDraws(monkeypatch, ints=[0, 0, 1, 0, 0], floats=[alpha])
        out = photometric_distortion(image, torch.Generator())
        draws.check_all_used()
        assert draws.calls[3] == ("uniform", 0.5, 1.5)
        assert torch.equal(out, _mmseg_saturation(image, alpha))


def test_photometric_hue_shifts_by_two_degree_steps(monkeypatch):
    """OpenCV's hue delta is in units of 2 degrees (H in [0, 180)): delta 15 turns every hue by 30 degrees. The exact
    rotated colour is compared up to uint8 rounding (|out - exact| < 1: one of the two integers around it)."""
    image = _photo_image()
    draws = _ScriptedDraws(monkeypatch, ints=[0, 0, 0, 1, 15, 0])
    out = photometric_distortion(image, torch.Generator())
    draws.check_all_used()
    assert draws.calls[4] == ("randint", -18, 18)
    exact = _per_pixel_hsv(image, lambda h, s, v: ((h + 15 / 180) % 1.0, s, v))
    assert ((out.double() - exact).abs() < 1).all(), (out.double() - exact).abs().max()
    assert torch.equal(out[:, 0, :3], image[:, 0, :3])  # black, white, grey have no hue
    assert out[:, 0, 3].tolist() == [255, 127, 0] or out[:, 0, 3].tolist() == [255, 128, 0]  # red -> 30 degrees


@pytest.mark.parametrize("contrast_first", [True, False])
def test_photometric_steps_run_in_mmseg_order(monkeypatch, contrast_first):
    """brightness -> contrast (mode 1) -> saturation -> hue -> contrast (mode 0), hue off here (compared exactly)."""
    image = _photo_image()
    brightened = _mmseg_convert(image, beta=9.5)
    first = _mmseg_saturation(_mmseg_convert(brightened, alpha=CONTRAST), SATURATION)
    last = _mmseg_convert(_mmseg_saturation(brightened, SATURATION), alpha=CONTRAST)
    assert not torch.equal(first, last)  # the order shows in the result (clipping and truncation in between)
    if contrast_first:
        draws = _ScriptedDraws(monkeypatch, ints=[1, 1, 1, 1, 0], floats=[9.5, CONTRAST, SATURATION])
    else:
        draws = _ScriptedDraws(monkeypatch, ints=[1, 0, 1, 0, 1], floats=[9.5, SATURATION, CONTRAST])
    out = photometric_distortion(image, torch.Generator())
    draws.check_all_used()
    assert torch.equal(out, first if contrast_first else last)
