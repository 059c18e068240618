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
    for i, variant in enumerate(variants):
        np.testing.assert_array_equal(as_rgb_uint8(variant), rgb)
        result = segmenter(variant)  # the segmenter's own path for each type, not only the conversion
        torch.testing.assert_close(result.scores, expected.scores, rtol=0, atol=0, msg=f"variant {i}")
        assert torch.equal(result.labels, expected.labels), f"variant {i}"
    gray = segmenter(rgb[:, :, 0])
    assert gray.labels.shape == (30, 50)
    assert sum(expected.areas().values()) == pytest.approx(1.0)
    assert list(expected.areas()) == sorted(expected.areas(), key=lambda n: -expected.areas()[n])


@pytest.mark.parametrize(
    "image, message",
    [(np.full((4, 4, 3), 1.0000001, np.float32), "got \\[1.00000012, 1.00000012\\]"),
     (np.ones((4, 4, 3), bool), "boolean arrays are masks"), (np.full((4, 4), np.nan), "NaN or inf"),
     (np.full((4, 4, 3), 2.0), "values in \\[0, 1\\]"), (np.zeros((4, 4, 2), np.uint8), "\\(H, W, 1\\|3\\|4\\)"),
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


def test_model_input_is_the_official_test_preprocessing():
    """predict's model input equals cascade-clip eval's: resize the 0..255 image to the official test size, round
    back to integers, then normalise (mmseg's order), not normalise-then-resize in floats."""
    from cascade_clip.transforms import eval_resize

    seen_inputs = []

    def score_fn(images):
        seen_inputs.append(images)
        return torch.zeros(1, 2, *images.shape[-2:])

    rgb = np.random.default_rng(1).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    Segmenter(score_fn=score_fn, class_names=["a", "b"], short_side=64)(rgb)
    (got,) = seen_inputs
    assert got.shape[-2:] == (64, 96)
    expected = eval_resize(torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0), 64)
    assert torch.equal(got, expected)
    # normalise-then-resize (the old order) gives another input: the test can tell them apart
    from cascade_clip.image_io import normalize_rgb
    from cascade_clip.inference import resize_short_side

    assert not torch.allclose(resize_short_side(normalize_rgb(rgb).unsqueeze(0), 64), expected, atol=1e-3)


@pytest.mark.parametrize("size,expected", [
    ((375, 500), (512, 683)),  # a VOC image: 666.67 -> 683 (500 * 512 / 375 = 682.67)
    ((500, 375), (683, 512)),
    ((480, 640), (512, 683)),  # COCO
    ((1024, 1025), (512, 513)),  # 512.5 rounds half up as in mmcv (Python's round would give 512)
    ((512, 512), (512, 512)),
    ((100, 1000), (512, 5120)),  # min_size: the (2048, 512) scale's long-side cap does not bind
])
def test_official_test_size(size, expected):
    from cascade_clip.inference import official_test_size

    assert official_test_size(*size, 512) == expected


def test_precision_runs_the_model_under_autocast():
    seen = []

    def score_fn(images):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.zeros(1, 2, *images.shape[-2:], dtype=torch.bfloat16)

    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    result = Segmenter(score_fn=score_fn, class_names=["a", "b"], short_side=None)(rgb)
    assert seen[-1][0] is False and result.scores.dtype == torch.float32  # fp32: the official inference
    Segmenter(score_fn=score_fn, class_names=["a", "b"], short_side=None, precision="bf16")(rgb)
    assert seen[-1] == (True, torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        Segmenter(score_fn=score_fn, class_names=["a", "b"], precision="fp8")


def test_bf16_scores_stay_close_to_fp32(segmenter):
    rgb = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    fp32 = segmenter(rgb).scores
    segmenter.precision = "bf16"
    try:
        bf16 = segmenter(rgb).scores
    finally:
        segmenter.precision = "fp32"
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it really ran in bf16
    torch.testing.assert_close(bf16, fp32, atol=3e-2, rtol=0)  # probabilities, bf16 rounding of the activations


def test_checkpoint_classes_use_the_stored_class_embeddings(tmp_path):
    """A checkpoint of this project stores the class embeddings it was trained with: predicting its own classes needs
    no CLIP weights and uses exactly those vectors (as eval does); other classes still need text weights."""
    from cascade_clip import CascadeCLIP, ModelConfig
    from cascade_clip.checkpoint import save_model_checkpoint

    cfg = ModelConfig.preset("voc", clip_model="cascade-tiny", img_size=64, num_prompt_tokens=4, crop_size=64,
                             stride=48, class_names=("sky", "road", "tree"), seen=(0, 1))
    stored = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    path = str(tmp_path / "latest.pt")
    save_model_checkpoint(path, CascadeCLIP(cfg), text_embeddings=stored, class_names=list(cfg.class_names))
    seg = Segmenter.from_checkpoint(path, "sky,road,tree", short_side=64, device="cpu", cache_dir=None)
    assert torch.equal(seg.text, stored)
    with pytest.raises(ValueError, match="no CLIP text weights"):
        Segmenter.from_checkpoint(path, "sky,tree", short_side=64, device="cpu", cache_dir=None)


def test_checkpoint_whose_clip_file_moved_names_it_and_the_flags(tmp_path):
    from cascade_clip import CascadeCLIP, ModelConfig
    from cascade_clip.checkpoint import save_model_checkpoint

    cfg = ModelConfig.preset("voc", clip_model="cascade-tiny", img_size=64, num_prompt_tokens=4, crop_size=64, stride=48,
                             clip_pretrained=None)
    model = CascadeCLIP(cfg)
    model.cfg = ModelConfig.from_dict({**cfg.to_dict(), "clip_pretrained": "weights/gone.pt"})
    path = str(tmp_path / "latest.pt")
    save_model_checkpoint(path, model)
    with pytest.raises(ValueError, match=r"records its CLIP weights as weights/gone.pt .*--clip-weights.*--text-embeddings"):
        Segmenter.from_checkpoint(path, "cat,dog", short_side=64, device="cpu", cache_dir=None)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values to 255 (a white picture) and floats to 0 (black): they are scaled to
    8 bits instead, from files and from PIL images alike."""
    from cascade_clip.image_io import read_rgb

    ramp = np.linspace(0, 65535, 5 * 7).reshape(5, 7).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
        from_pil = as_rgb_uint8(image)
    expected = np.repeat(np.round(ramp / 257.0).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "deep.png")), expected)
    np.testing.assert_array_equal(from_pil, expected)
    unit = np.linspace(0, 1, 5 * 7, dtype=np.float32).reshape(5, 7)
    np.testing.assert_array_equal(as_rgb_uint8(Image.fromarray(unit)), as_rgb_uint8(unit))
    # PIL's own conventions still hold: mode F on 0..255, mode I holding 8-bit values
    on_255 = as_rgb_uint8(Image.fromarray(unit * 255)).astype(int)  # (the float32 product rounds .5 either way)
    assert np.abs(on_255 - as_rgb_uint8(unit)).max() <= 1 and on_255.max() == 255
    eight = np.array([[0, 128, 255]], dtype=np.int32)
    np.testing.assert_array_equal(as_rgb_uint8(Image.fromarray(eight))[..., 0], eight.astype(np.uint8))
    with pytest.raises(ValueError, match=r"a mode F image must hold values in .* got \[0, 300\]"):
        as_rgb_uint8(Image.fromarray(unit * 300))


def test_pil_images_are_turned_upright_like_paths(tmp_path):
    """seg(Image.open(p)) and seg(p) see the same (displayed) picture of an EXIF-rotated photo."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 16, 3), dtype=np.uint8)).save(
        tmp_path / "p.jpg", exif=exif)
    with Image.open(tmp_path / "p.jpg") as image:
        from_pil = as_rgb_uint8(image)
    np.testing.assert_array_equal(from_pil, as_rgb_uint8(str(tmp_path / "p.jpg")))
    assert from_pil.shape == (16, 10, 3)


def test_half_precision_tensors_are_images():
    image = torch.rand(3, 6, 5)
    np.testing.assert_array_equal(as_rgb_uint8(image.bfloat16()), as_rgb_uint8(image.bfloat16().float()))


def test_images_over_pils_size_limit_are_a_named_error(tmp_path, monkeypatch):
    from cascade_clip.image_io import read_rgb

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels is over twice the limit: PIL's error, not a warning
    with pytest.raises(ValueError, match="big.png: larger than PIL's safety limit of 100 pixels"):
        read_rgb(str(tmp_path / "big.png"))


def test_one_class_is_warned(tmp_path):
    with pytest.warns(UserWarning, match="one class \\('cat'\\): every pixel gets it"):
        Segmenter(score_fn=lambda x: x, class_names=["cat"])


def test_extreme_aspect_ratios_are_refused_before_they_exhaust_memory():
    """The official test resize keeps the aspect ratio with no cap on the long side: a 1x1000 strip would be tested at
    512x512000. That is a named error (predict skips such an image with it), not an allocation failure."""
    seg = Segmenter(score_fn=lambda x: x, class_names=[f"c{i}" for i in range(59)])
    with pytest.raises(ValueError, match=r"a 1000x1 image is tested at 512000x512 .* 59 classes need 58 GiB"):
        seg(np.zeros((1, 1000, 3), np.uint8))
