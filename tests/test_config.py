"""Presets and overrides of ModelConfig."""

import pytest

from cascade_clip import ModelConfig
from cascade_clip.catalog import dataset_info, prompt_templates


@pytest.mark.parametrize("name, tokens, classes, seen", [("voc", 10, 20, 15), ("context", 35, 59, 49), ("coco", 50, 171, 156)])
def test_presets_follow_the_paper(name, tokens, classes, seen):
    cfg = ModelConfig.preset(name)
    assert cfg.num_prompt_tokens == tokens
    assert len(cfg.class_names) == classes and len(cfg.seen) == seen
    assert set(cfg.seen) | set(cfg.unseen) == set(range(classes)) and not set(cfg.seen) & set(cfg.unseen)
    assert cfg.unseen == dataset_info(name).unseen
    assert cfg.clip_model == "ViT-B-16" and cfg.img_size == 512 and cfg.seen_calibration == 0.1


def test_overrides_and_round_trip():
    cfg = ModelConfig.preset("coco", img_size=640, clip_model="cascade-tiny", decoder_heads=2)
    assert (cfg.img_size, cfg.clip_model, cfg.decoder_heads, cfg.num_prompt_tokens) == (640, "cascade-tiny", 2, 50)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_presets_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown preset 'ade'"):
        ModelConfig.preset("ade")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['imgsize'\]"):
        ModelConfig.preset("voc", imgsize=3)
    with pytest.raises(ValueError, match="out of range"):
        ModelConfig.preset("voc", seen=(0, 25))


def test_prompt_templates():
    assert prompt_templates("single") == ["a photo of a {}"]
    assert len(prompt_templates("multi")) == 15
