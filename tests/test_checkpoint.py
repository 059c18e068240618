"""Checkpoints of this project and official ones load into a model; writes are atomic."""

import os
import warnings

import pytest
import torch

from cascade_clip import CascadeCLIP, ModelConfig
from cascade_clip.checkpoint import (
    AmbiguousCheckpointWarning,
    load_model,
    official_preset,
    save_atomic,
    save_model_checkpoint,
)

TINY = dict(clip_model="cascade-tiny", img_size=64, num_prompt_tokens=4, decoder_heads=4, decoder_ffn_dim=256)


def test_own_checkpoint_round_trip(tmp_path):
    model = CascadeCLIP(ModelConfig.preset("coco", **TINY))
    path = str(tmp_path / "latest.pt")
    save_model_checkpoint(path, model, iteration=7)
    loaded, raw = load_model(path)
    assert raw["iteration"] == 7 and loaded.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not loaded.training
    assert load_model(path, crop_size=128, stride=96)[0].cfg.crop_size == 128


def test_official_checkpoint_with_explicit_config(tmp_path):
    cfg = ModelConfig.preset("voc", **TINY)
    model = CascadeCLIP(cfg)
    path = str(tmp_path / "official.pth")
    torch.save({"meta": {}, "state_dict": model.official_state_dict()}, path)
    loaded, _ = load_model(path, config=cfg)
    assert torch.equal(loaded.backbone.prompt_embeddings, model.backbone.prompt_embeddings)


def test_official_preset_is_recognised_from_prompt_count():
    assert official_preset({"backbone.prompt_embeddings": torch.zeros(1, 50, 768)}) == "coco"
    assert official_preset({"backbone.prompt_embeddings": torch.zeros(1, 35, 768)}) == "context"
    with pytest.raises(ValueError, match="7 prompt tokens"):
        official_preset({"backbone.prompt_embeddings": torch.zeros(1, 7, 768)})


BUFFER = "decode_head.loss_decode.criterion.empty_weight"
TOKENS = {"voc": 10, "context": 35, "coco": 50}


@pytest.mark.parametrize("dataset,seen,total", [("voc", 15, 20), ("context", 49, 59), ("coco", 156, 171)])
def test_official_self_training_checkpoint_is_recognised(dataset, seen, total):
    """The official loss buffer is ones(num_classes + 1): VOC's self-training config trains on all 20 classes (21
    entries against 16), but the Context and COCO-Stuff self-training configs keep num_classes = len(base_class), like
    their inductive ones. A self-training model is evaluated without the seen calibration (MODEL_SPEC.md 3.5, 6.3)."""
    prompts = {"backbone.prompt_embeddings": torch.zeros(1, TOKENS[dataset], 768)}
    assert official_preset(prompts) == dataset  # no buffer: inductive
    assert official_preset({**prompts, BUFFER: torch.ones(total + 1)}) == f"{dataset}-st"
    assert ModelConfig.preset(f"{dataset}-st").seen_calibration == 0.0
    if dataset == "voc":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # seen + 1 is unambiguous for VOC
            assert official_preset({**prompts, BUFFER: torch.ones(seen + 1)}) == dataset
    else:  # seen + 1 is both official configs' size: inductive, with a warning that says how to evaluate -st
        with pytest.warns(AmbiguousCheckpointWarning, match=f"{dataset}-st model, evaluate without calibration"):
            assert official_preset({**prompts, BUFFER: torch.ones(seen + 1)}) == dataset
    with pytest.warns(UserWarning, match="taking it as inductive"):
        assert official_preset({**prompts, BUFFER: torch.ones(seen + 3)}) == dataset


@pytest.mark.parametrize("dataset", ["voc", "context", "coco"])
def test_official_meta_decides_inductive_or_self_training(dataset):
    """mmseg stores the config text (meta['config']) and the config file's name (meta['exp_name']) in its checkpoints;
    either settles what the loss buffer cannot, and the config text wins over the name."""
    seen = len(ModelConfig.preset(dataset).seen)
    state = {"backbone.prompt_embeddings": torch.zeros(1, TOKENS[dataset], 768), BUFFER: torch.ones(seen + 1)}
    st_config = "model = dict(\n    type='CascadeCLIP',\n    base_class=[0, 1],\n    self_training=True,\n    ft_backbone=False)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert official_preset(state, {"config": st_config}) == f"{dataset}-st"
        assert official_preset(state, {"config": st_config.replace("True", "False")}) == dataset
        assert official_preset(state, {"exp_name": "vpt_seg_zero_vit-b_512x512_40k_12_100_multi_st.py"}) == f"{dataset}-st"
        assert official_preset(state, {"exp_name": "vpt_seg_zero_vit-b_512x512_80k_12_100_multi.py"}) == dataset
        assert official_preset(state, {"config": st_config, "exp_name": "x.py"}) == f"{dataset}-st"


def test_official_coco_st_checkpoint_with_meta_loads_without_calibration(tmp_path):
    tiny = {**TINY, "num_prompt_tokens": 50}
    state = CascadeCLIP(ModelConfig.preset("coco", **tiny)).official_state_dict()
    assert state[BUFFER].numel() == 157  # the official inductive (and -st) size
    path = str(tmp_path / "coco_st.pth")
    torch.save({"meta": {"config": "model = dict(self_training=True)", "iter": 40000}, "state_dict": state}, path)
    assert load_model(path, **tiny)[0].cfg.seen_calibration == 0.0
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)
    with pytest.warns(AmbiguousCheckpointWarning):
        assert load_model(path, **tiny)[0].cfg.seen_calibration == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller chose the calibration: nothing to warn about
        assert load_model(path, seen_calibration=0.0, **tiny)[0].cfg.seen_calibration == 0.0


@pytest.mark.parametrize("preset", ["voc", "voc-st", "context", "context-st", "coco", "coco-st"])
def test_exported_official_checkpoint_keeps_inductive_or_self_training(tmp_path, preset):
    """official_state_dict() writes the loss buffer (seen + 1 inductive, all + 1 self-training), so an exported model
    is recognised as what it was, with or without the seen calibration."""
    dataset = preset.split("-")[0]
    tiny = {**TINY, "num_prompt_tokens": TOKENS[dataset]}
    model = CascadeCLIP(ModelConfig.preset(preset, **tiny))
    path = str(tmp_path / "exported.pth")
    torch.save({"meta": {}, "state_dict": model.official_state_dict()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AmbiguousCheckpointWarning)  # inductive Context/COCO exports are ambiguous
        loaded, _ = load_model(path, **tiny)
    assert loaded.cfg.seen_calibration == model.cfg.seen_calibration
    assert loaded.cfg.dataset == dataset


def test_official_voc_st_checkpoint_loads_without_calibration(tmp_path):
    tiny = {**TINY, "num_prompt_tokens": 10}  # VOC's count: the dataset is recognised from it
    model = CascadeCLIP(ModelConfig.preset("voc-st", **tiny))
    state = model.official_state_dict()
    state["decode_head.loss_decode.criterion.empty_weight"] = torch.ones(21)
    path = str(tmp_path / "voc_st.pth")
    torch.save({"meta": {}, "state_dict": state}, path)
    # the architecture overrides (tiny CLIP) are the caller's; the preset (and so the calibration) is recognised
    loaded, _ = load_model(path, **tiny)
    assert loaded.cfg.seen_calibration == 0.0
    state["decode_head.loss_decode.criterion.empty_weight"] = torch.ones(16)
    torch.save({"meta": {}, "state_dict": state}, path)
    loaded, _ = load_model(path, **tiny)
    assert loaded.cfg.seen_calibration == 0.1


def test_mismatched_checkpoint_is_named(tmp_path):
    model = CascadeCLIP(ModelConfig.preset("voc", **TINY))
    path = str(tmp_path / "latest.pt")
    save_model_checkpoint(path, model)
    with pytest.raises(ValueError, match="does not match the model configuration"):
        load_model(path, config=ModelConfig.preset("voc", **{**TINY, "decoder_ffn_dim": 128}))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_atomic(path, {"a": torch.ones(2)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic(path, {"a": Unpicklable()})
    assert torch.load(path)["a"].tolist() == [1.0, 1.0]  # the old file is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary left behind


def test_load_ignores_a_moved_clip_file_and_rejects_unknown_overrides(tmp_path):
    model = CascadeCLIP(ModelConfig.preset("voc", **TINY))
    model.cfg.clip_pretrained = str(tmp_path / "moved-away.pt")  # recorded at training time, gone now
    path = str(tmp_path / "latest.pt")
    save_model_checkpoint(path, model)
    loaded, _ = load_model(path)
    assert torch.equal(loaded.backbone.conv1.weight, model.backbone.conv1.weight)
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['crop'\]"):
        load_model(path, crop=3)


_CALLS = []


def _record_call(what):
    _CALLS.append(what)


class _RunsCode:
    """Unpickling this calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record_call, ("unpickled",))


def test_checkpoints_are_read_without_running_code(tmp_path, monkeypatch):
    """Checkpoints load tensors, plain containers and numpy arrays only; a file asking for anything else is refused
    (nothing runs) unless CASCADE_CLIP_TRUST_CHECKPOINTS=1."""
    from cascade_clip.safe_load import TRUST_VARIABLE, load_checkpoint_file

    monkeypatch.delenv(TRUST_VARIABLE, raising=False)
    import numpy as np

    plain = tmp_path / "plain.pt"
    meta = {"config": "x", "iter": 3, "hook_msgs": {"best_score": np.float64(0.5)}}  # mmcv EvalHook keeps scalars
    torch.save({"w": torch.ones(2), "rng": np.random.get_state(), "meta": meta}, plain)
    loaded = load_checkpoint_file(str(plain))
    assert loaded["meta"]["iter"] == 3 and loaded["meta"]["hook_msgs"]["best_score"] == 0.5
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": _RunsCode()}, evil)
    for read in (load_checkpoint_file, load_model):
        with pytest.raises(ValueError, match=rf"evil.pth: holds Python objects .*{TRUST_VARIABLE}=1") as info:
            read(str(evil))
        assert "_record_call" in str(info.value) and "numpy" not in str(info.value)  # only what is not allowed
    assert _CALLS == []
    monkeypatch.setenv(TRUST_VARIABLE, "1")
    load_checkpoint_file(str(evil))
    assert _CALLS == ["unpickled"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    monkeypatch.delenv(TRUST_VARIABLE)
    with pytest.raises(ValueError, match="garbage.pt: cannot read as a PyTorch checkpoint"):
        load_checkpoint_file(str(garbage))


def test_numpy_objects_pickled_under_numpy_1_load(tmp_path):
    """mmcv-era files name numpy's reconstructors numpy.core.multiarray.* (numpy 2: numpy._core): both are allowed."""
    import io

    import numpy as np

    from cascade_clip.safe_load import load_checkpoint_file

    buf = io.BytesIO()  # the legacy (non-zip) format keeps the pickle as plain bytes, so the module name can be edited
    torch.save({"meta": {"best": np.float64(0.5), "arr": np.arange(3)}}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "numpy1.pth"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    meta = load_checkpoint_file(str(path))["meta"]
    assert meta["best"] == 0.5 and meta["arr"].tolist() == [0, 1, 2]
