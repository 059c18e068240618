"""CLIP weights from local files (OpenAI's TorchScript release format or a state dict), resized to the crop grid."""

import pytest
import torch

from cascade_clip import CascadeCLIP, ModelConfig
from cascade_clip.backbone import resize_pos_grid
from cascade_clip.clip_arch import create_clip

TINY = dict(clip_model="cascade-tiny", num_prompt_tokens=4, decoder_heads=4, decoder_ffn_dim=256)


@pytest.fixture(scope="module")
def source_clip():
    torch.manual_seed(3)
    return create_clip("cascade-tiny").eval()


def _check_loaded(model: CascadeCLIP, source, grid: int):
    visual = source.visual
    assert torch.equal(model.backbone.conv1.weight, visual.conv1.weight)
    assert torch.equal(model.backbone.proj, visual.proj)
    block = model.backbone.transformer.resblocks[7]
    assert torch.equal(block.attn.in_proj_weight, visual.transformer.resblocks[7].attn.in_proj_weight)
    pos = model.backbone.positional_embedding
    assert torch.equal(pos[0], visual.positional_embedding[0])
    torch.testing.assert_close(pos[1:], resize_pos_grid(visual.positional_embedding[1:].detach(), (grid, grid)))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_release_file_loads(tmp_path, source_clip):
    path = tmp_path / "tiny-openai-format.pt"
    torch.jit.trace_module(source_clip, {"encode_image": torch.randn(1, 3, 64, 64)}).save(str(path))
    model = CascadeCLIP(ModelConfig.preset("voc", img_size=128, clip_pretrained=str(path), **TINY))
    _check_loaded(model, source_clip, grid=8)


def test_state_dict_file_loads(tmp_path, source_clip):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source_clip.state_dict().items()}}, path)
    model = CascadeCLIP(ModelConfig.preset("voc", img_size=64, clip_pretrained=str(path), **TINY))
    _check_loaded(model, source_clip, grid=4)


def test_missing_or_wrong_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        CascadeCLIP(ModelConfig.preset("voc", img_size=64, clip_pretrained=str(tmp_path / "none.pt"), **TINY))
    path = tmp_path / "text-only.pt"
    torch.save({"token_embedding.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="do not fit architecture 'cascade-tiny'"):
        CascadeCLIP(ModelConfig.preset("voc", img_size=64, clip_pretrained=str(path), **TINY))
    torch.save({"token_embedding.weight": torch.zeros(49408, 64)}, path)
    with pytest.raises(ValueError, match="lack image-tower keys"):
        CascadeCLIP(ModelConfig.preset("voc", img_size=64, clip_pretrained=str(path), **TINY))


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        CascadeCLIP(ModelConfig.preset("voc", clip_model="ViT-Q-99"))


def test_crop_must_be_a_patch_multiple():
    with pytest.raises(ValueError, match="img_size 100 is not a multiple of the patch size 16"):
        CascadeCLIP(ModelConfig.preset("voc", img_size=100, **TINY))
