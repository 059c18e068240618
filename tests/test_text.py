"""Class-name embeddings: templating, normalisation, official text weights, the disk cache, .npy files."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cascade_clip import text as text_mod
from cascade_clip.clip_arch import create_clip


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(5)
    model = create_clip("cascade-tiny")
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path), model.eval()


def test_templates_are_averaged_after_normalisation(clip_file):
    _, model = clip_file
    import open_clip

    tok = open_clip.get_tokenizer("cascade-tiny")
    names = ["cat", "traffic light"]
    templates = ["a photo of a {}.", "There is a {} in the scene."]
    with torch.no_grad():
        per = [F.normalize(model.encode_text(tok([t.format(n) for n in names])), dim=-1) for t in templates]
    expected = F.normalize((per[0] + per[1]) / 2, dim=-1)
    got = text_mod.encode_class_names(model, names, templates, clip_model="cascade-tiny")
    torch.testing.assert_close(got, expected)
    single = text_mod.encode_class_names(model, names, "single", clip_model="cascade-tiny")
    with torch.no_grad():
        torch.testing.assert_close(single, F.normalize(model.encode_text(tok([f"a photo of a {n}" for n in names])), dim=-1))
    assert single.shape == (2, 64) and single.dtype == torch.float32


def test_cache_hit_skips_the_encoder(clip_file, tmp_path, monkeypatch):
    path, _ = clip_file
    first = text_mod.class_embeddings(["a", "b"], clip_model="cascade-tiny", pretrained=path, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(text_mod, "build_text_model", fail)
    second = text_mod.class_embeddings(["a", "b"], clip_model="cascade-tiny", pretrained=path, cache_dir=str(tmp_path))
    torch.testing.assert_close(first, second)
    with pytest.raises(AssertionError, match="cache should have answered"):  # other names: another key
        text_mod.class_embeddings(["a", "c"], clip_model="cascade-tiny", pretrained=path, cache_dir=str(tmp_path))
    with pytest.raises(AssertionError, match="cache should have answered"):  # other templates: another key
        text_mod.class_embeddings(["a", "b"], clip_model="cascade-tiny", pretrained=path, templates="multi", cache_dir=str(tmp_path))


def test_official_checkpoint_text_weights(clip_file, tmp_path):
    path, model = clip_file
    official = {"text_encoder." + k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    official["decode_head.weights_s1"] = torch.ones(3)
    ckpt = tmp_path / "official.pth"
    torch.save({"state_dict": official}, ckpt)
    from_ckpt = text_mod.class_embeddings(["sky"], clip_model="cascade-tiny", official_checkpoint=str(ckpt), cache_dir=None)
    from_clip = text_mod.class_embeddings(["sky"], clip_model="cascade-tiny", pretrained=path, cache_dir=None)
    torch.testing.assert_close(from_ckpt, from_clip)
    with pytest.raises(ValueError, match="no text_encoder"):
        text_mod.text_state_from_official({"decode_head.weights_s1": torch.ones(3)})


@pytest.mark.parametrize("names, match", [([], "empty"), (["cat", " cat"], "duplicate"), (["cat", ""], "empty class name")])
def test_bad_class_lists(names, match):
    with pytest.raises(ValueError, match=match):
        text_mod.check_class_names(names)


def test_npy_round_trip_and_errors(tmp_path):
    emb = F.normalize(torch.randn(4, 8), dim=-1)
    path = str(tmp_path / "sub" / "emb.npy")
    text_mod.save_embeddings(path, emb)
    torch.testing.assert_close(text_mod.load_embeddings(path, dim=8), emb)
    # Official files are fp16 and used as stored (not renormalised).
    np.save(tmp_path / "fp16.npy", emb.numpy().astype(np.float16))
    loaded = text_mod.load_embeddings(str(tmp_path / "fp16.npy"))
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, emb.half().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="512 wide|needs 512"):
        text_mod.load_embeddings(path, dim=512)
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(C, D\)"):
        text_mod.load_embeddings(str(tmp_path / "flat.npy"))
    with pytest.raises(ValueError, match="not found"):
        text_mod.load_embeddings(str(tmp_path / "nope.npy"))


def test_activation_reaches_the_text_tower_and_the_cache_key(clip_file, tmp_path):
    """Weights trained with GELU (quick_gelu=False) must be embedded with GELU: another tower, other embeddings, and
    another cache entry (an embedding made with the wrong activation must never answer)."""
    path, _ = clip_file
    quick = text_mod.class_embeddings(["a", "b"], clip_model="cascade-tiny", pretrained=path, cache_dir=str(tmp_path))
    gelu = text_mod.class_embeddings(["a", "b"], clip_model="cascade-tiny", pretrained=path, cache_dir=str(tmp_path),
                                     quick_gelu=False)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert not torch.allclose(quick, gelu)
    tower = text_mod.build_text_model("cascade-tiny", path, quick_gelu=False)
    assert type(tower.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    torch.testing.assert_close(gelu, text_mod.encode_class_names(tower, ["a", "b"], clip_model="cascade-tiny"))


def test_embedding_files_with_nan_or_zero_rows_are_refused(tmp_path):
    """A NaN row once made every pixel that class (NaN scores win the argmax), a zero row gives no direction."""
    good = F.normalize(torch.randn(3, 8), dim=-1).numpy()
    for row, value, message in ((1, np.nan, r"rows \[1\] hold NaN or inf"), (2, np.inf, r"rows \[2\] hold NaN or inf"),
                                (0, 0.0, r"rows \[0\] are all zeros")):
        bad = good.copy()
        bad[row] = value
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(ValueError, match=message):
            text_mod.load_embeddings(str(tmp_path / "bad.npy"))


def test_names_past_clips_context_are_warned(clip_file):
    path, _ = clip_file
    long_names = ["a " + "very " * 80 + "red car", "a " + "very " * 80 + "blue car"]
    with pytest.warns(UserWarning, match="2 class name\\(s\\) exceed CLIP's 77-token context"):
        emb = text_mod.class_embeddings(long_names, clip_model="cascade-tiny", pretrained=path, cache_dir=None)
    torch.testing.assert_close(emb[0], emb[1])  # what the warning is about: cut at the same token, one embedding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_mod.class_embeddings(["red car"], clip_model="cascade-tiny", pretrained=path, cache_dir=None)
