"""Training-free dense CLIP (MaskCLIP recipe) against a plain PyTorch computation of the same recipe."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cascade_clip import predict
from cascade_clip.clip_arch import create_clip
from cascade_clip.training_free import DenseCLIP, clip_temperature


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(21)
    return create_clip("cascade-tiny").eval()


def plain_attention(block, x):
    """Multi-head self-attention of an open_clip block written out: (B, L, W) -> (B, L, W)."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(width, dim=-1)
    split = lambda t: t.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) * (width // heads) ** -0.5).softmax(-1)
    return attn.out_proj((weights @ split(v)).transpose(1, 2).flatten(2))


def plain_dense_logits(visual, images, text, temperature):
    """The recipe with nothing from the package: resized positions, blocks 0..L-2, value path of block L-1."""
    patch = visual.conv1.kernel_size[0]
    h, w = images.shape[-2] // patch, images.shape[-1] // patch
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    side = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(h * w, -1)
    x = torch.cat([(visual.class_embedding + pos[0]).expand(x.shape[0], 1, -1), x + grid], dim=1)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = x + plain_attention(block, block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
    last = blocks[-1]
    width = x.shape[-1]
    v = last.ln_1(x[:, 1:]) @ last.attn.in_proj_weight[2 * width :].T + last.attn.in_proj_bias[2 * width :]
    feats = visual.ln_post(last.attn.out_proj(v)) @ visual.proj  # (B, N, D)
    cos = F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).T  # (B, N, C)
    logits = (cos / temperature).transpose(1, 2).unflatten(-1, (h, w))
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("size", [(64, 64), (48, 112)])  # native grid, and a resized non-square one
def test_dense_logits_match_the_plain_recipe(clip, size):
    torch.manual_seed(0)
    images = torch.randn(2, 3, *size)
    text = torch.randn(5, 64)
    dense = DenseCLIP(clip.visual, temperature=clip_temperature(clip))
    with torch.no_grad():
        got = dense(images, text)
        expected = plain_dense_logits(clip.visual, images, text, clip_temperature(clip))
    assert got.shape == (2, 5, *size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_last_block_input_agrees_with_open_clip_forward_intermediates(clip):
    """At the native size our token path equals open_clip's own public forward (a check of the embedding)."""
    images = torch.randn(1, 3, 64, 64)
    dense = DenseCLIP(clip.visual, temperature=0.01)
    with torch.no_grad():
        x, _ = dense._tokens(images)
        x = dense._blocks(x, clip.visual.transformer.resblocks[:-1])
        blocks = len(clip.visual.transformer.resblocks)
        out = clip.visual.forward_intermediates(images, indices=[blocks - 2], output_fmt="NLC",
                                                output_extra_tokens=True, intermediates_only=True)
    reference = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


def test_segment_gives_window_averaged_softmax(clip):
    dense = DenseCLIP(clip.visual, temperature=clip_temperature(clip))
    images, text = torch.randn(1, 3, 70, 150), torch.randn(3, 64)
    scores = dense.segment(images, text, crop=64, stride=48)
    assert scores.shape == (1, 3, 70, 150)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(1, 70, 150))
    one_window = dense.segment(images[..., :64, :64], text, crop=64, stride=48)
    torch.testing.assert_close(one_window, dense(images[..., :64, :64], text).softmax(dim=1))


def test_temperature_and_bad_towers(clip):
    assert clip_temperature(clip) == pytest.approx(0.07, rel=1e-3)  # open_clip's init: logit_scale = log(1 / 0.07)
    with pytest.raises(ValueError, match="temperature must be positive"):
        DenseCLIP(clip.visual, temperature=0.0)
    with pytest.raises(ValueError, match="patch size"):
        DenseCLIP(clip.visual, temperature=0.01)(torch.randn(1, 3, 40, 64), torch.randn(2, 64))


def test_predict_training_free_cli(clip, tmp_path, capsys):
    weights = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), weights)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 90, 3), dtype=np.uint8)).save(image)
    common = ["--training-free", "--clip-model", "cascade-tiny", "--classes", "cat,dog,grass", "--short-side", "64",
              "--crop-size", "64", "--stride", "48", "--no-cache", "--no-progress", str(image),
              "--out", str(tmp_path / "out")]
    predict.main([*common, "--clip-weights", str(weights)])
    labels = Image.open(tmp_path / "out" / "photo.png")
    assert labels.size == (90, 45) and np.asarray(labels).max() < 3
    assert (tmp_path / "out" / "photo_overlay.png").is_file()
    with pytest.raises(SystemExit):
        predict.main(common)
    assert "training-free mode needs CLIP weights" in capsys.readouterr().err
