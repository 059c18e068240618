"""``cascade_clip.Segmenter``: image types, label/score consistency, chunked argmax, the lazy export."""

import numpy as np
import pytest
import torch
from PIL import Image

import cascade_clip
from cascade_clip.segmenter import Segmenter, as_rgb_uint8, labels_at_size


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from cascade_clip.clip_arch import create_clip

    torch.manual_seed(8)
    weights = tmp_path_factory.mktemp("seg") / "clip.pt"
    torch.save(create_clip("cascade-tiny").state_dict(), weights)
    return Segmenter.training_free(str(weights), ["cat", "dog", "grass"], clip_model="cascade-tiny", short_side=64,
                                   crop_size=64, stride=48, cache_dir=None, device="cpu")


def test_lazy_export():
    assert cascade_clip.Segmenter is Segmenter


def test_every_image_type_gives_the_same_result(segmenter, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    variants = [
        rgb,
        Image.fromarray(rgb),
        Image.fromarray(np.dstack([rgb, np.full((30, 50), 7, np.uint8)])),  # RGBA: alpha dropped
        str(tmp_path / "x.png"),
        torch.from_numpy(rgb).permute(2, 0, 1),  # uint8 (3, H, W)
        torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).unsqueeze(0),  # float (1, 3, H, W) in [0, 1]
        rgb.astype(np.float64) / 255,  # float (H, W, 3) in [0, 1]
    ]
    expected = segmenter(rgb)
    assert expected.labels.shape == (30, 50) and expected.scores.shape == (3, 30, 50)
    for variant in variants:
        np.testing.assert_array_equal(as_rgb_uint8(variant), rgb)
    torch.testing.assert_close(segmenter(variants[-2]).scores, expected.scores)
    gray = segmenter(rgb[:, :, 0])
    assert gray.labels.shape == (30, 50)
    assert sum(expected.areas().values()) == pytest.approx(1.0)
    assert list(expected.areas()) == sorted(expected.areas(), key=lambda n: -expected.areas()[n])


@pytest.mark.parametrize(
    "image, message",
    [(np.full((4, 4, 3), 2.0), "values in \\[0, 1\\]"), (np.zeros((4, 4, 2), np.uint8), "\\(H, W, 1\\|3\\|4\\)"),
     (torch.zeros(5, 4, 4), "C in 1, 3, 4"), ([1, 2], "unsupported image type")],
)
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        as_rgb_uint8(image)


def test_labels_without_scores_equal_argmax(segmenter):
    rgb = np.random.default_rng(1).integers(0, 256, (41, 67, 3), dtype=np.uint8)
    full = segmenter(rgb)
    torch.testing.assert_close(full.labels, full.scores.argmax(dim=0))
    lean = segmenter(rgb, return_scores=False)
    assert lean.scores is None
    torch.testing.assert_close(lean.labels, full.labels)
    scores = torch.randn(1, 7, 5, 6)
    torch.testing.assert_close(labels_at_size(scores, (23, 17), chunk=2),
                               torch.nn.functional.interpolate(scores, (23, 17), mode="bilinear").argmax(1)[0])
