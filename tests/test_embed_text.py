"""``cascade-clip embed-text``: shape, normalisation, templates, class sources, the disk cache, official weights."""

import numpy as np
import pytest
import torch

from cascade_clip import embed_text
from cascade_clip import text as text_mod
from cascade_clip.catalog import dataset_info
from cascade_clip.clip_arch import create_clip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(11)
    model = create_clip("cascade-tiny").eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return str(path), model


def run(tmp_path, *args):
    out = tmp_path / "emb.npy"
    embed_text.main(["--clip-model", "cascade-tiny", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *args])
    return np.load(out)


def test_comma_list_shape_normalisation_and_recipe(clip_file, tmp_path):
    path, model = clip_file
    got = run(tmp_path, "--classes", "cat, dog,traffic light", "--clip-weights", path)
    assert got.shape == (3, 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    expected = text_mod.encode_class_names(model, ["cat", "dog", "traffic light"], "single", clip_model="cascade-tiny")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_multi_and_file_templates(clip_file, tmp_path):
    path, model = clip_file
    multi = run(tmp_path, "--classes", "sky,road", "--clip-weights", path, "--templates", "multi")
    expected = text_mod.encode_class_names(model, ["sky", "road"], "multi", clip_model="cascade-tiny")
    np.testing.assert_allclose(multi, expected.numpy(), rtol=1e-5, atol=1e-6)
    single = run(tmp_path, "--classes", "sky,road", "--clip-weights", path, "--templates", "single")
    assert not np.allclose(multi, single)
    template_file = tmp_path / "templates.txt"
    template_file.write_text("a photo of a {}.\n\nThere is a {} in the scene.\n")
    from_file = run(tmp_path, "--classes", "sky,road", "--clip-weights", path, "--templates", str(template_file))
    expected = text_mod.encode_class_names(
        model, ["sky", "road"], ["a photo of a {}.", "There is a {} in the scene."], clip_model="cascade-tiny"
    )
    np.testing.assert_allclose(from_file, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_preset_and_class_file(clip_file, tmp_path):
    path, model = clip_file
    voc = run(tmp_path, "--classes", "voc", "--clip-weights", path)  # VOC's official set: single template
    names = list(dataset_info("voc").classes)
    expected = text_mod.encode_class_names(model, names, "single", clip_model="cascade-tiny")
    np.testing.assert_allclose(voc, expected.numpy(), rtol=1e-5, atol=1e-6)
    class_file = tmp_path / "names.txt"
    class_file.write_text("# my classes\ncat\n\n  dog  \n")
    from_file = run(tmp_path, "--classes", str(class_file), "--clip-weights", path)
    np.testing.assert_allclose(from_file, voc[[7, 11]], rtol=1e-5, atol=1e-6)


def test_second_run_is_a_cache_hit(clip_file, tmp_path, monkeypatch):
    path, _ = clip_file
    first = run(tmp_path, "--classes", "cat,dog", "--clip-weights", path)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_encoder(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(text_mod, "build_text_model", no_encoder)
    np.testing.assert_array_equal(run(tmp_path, "--classes", "cat,dog", "--clip-weights", path), first)
    with pytest.raises(AssertionError, match="cache should have answered"):
        run(tmp_path, "--classes", "cat,dog", "--clip-weights", path, "--no-cache")


def official_text_checkpoint(model, path, prompt_tokens):
    """An official-layout checkpoint holding ``model``'s text tower (text_encoder.*) and a prompt tensor whose token
    count names the dataset (VOC 10, Context 35, COCO 50)."""
    official = {"text_encoder." + k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    official["backbone.prompt_embeddings"] = torch.zeros(1, prompt_tokens, 192)
    torch.save({"meta": {}, "state_dict": official}, path)
    return str(path)


def test_official_checkpoint_text_encoder(clip_file, tmp_path):
    path, model = clip_file
    ckpt = official_text_checkpoint(model, tmp_path / "official.pth", 10)
    from_ckpt = run(tmp_path, "--classes", "cat,sky", "--checkpoint", ckpt)
    from_clip = run(tmp_path, "--classes", "cat,sky", "--clip-weights", path)
    np.testing.assert_allclose(from_ckpt, from_clip, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "classes, message",
    [("", "the class list is empty"), ("cat,dog,cat", "duplicate class names"), ("cat,,dog", "empty class name"),
     ("missing/names.txt", "class file not found")],
)
def test_bad_class_lists_exit_with_a_clear_error(clip_file, tmp_path, capsys, classes, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--classes", classes, "--clip-weights", clip_file[0])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_no_text_weights_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--classes", "cat")
    assert "no CLIP text weights" in capsys.readouterr().err


def test_official_checkpoint_gets_its_dataset_templates(clip_file, tmp_path):
    """An official COCO checkpoint (50 prompt tokens) embeds with COCO's official templates (multi), as predict does."""
    _, model = clip_file
    ckpt = official_text_checkpoint(model, tmp_path / "coco.pth", 50)
    got = run(tmp_path, "--classes", "cat,sky", "--checkpoint", ckpt)
    expected = text_mod.encode_class_names(model, ["cat", "sky"], "multi", clip_model="cascade-tiny")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoint_of_no_known_dataset_with_explicit_templates(clip_file, tmp_path):
    """A text_encoder checkpoint whose prompt count names no dataset still embeds when the templates are given."""
    _, model = clip_file
    ckpt = official_text_checkpoint(model, tmp_path / "other.pth", 7)
    got = run(tmp_path, "--classes", "cat,sky", "--checkpoint", ckpt, "--templates", "multi")
    expected = text_mod.encode_class_names(model, ["cat", "sky"], "multi", clip_model="cascade-tiny")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_no_quick_gelu_flag(clip_file, tmp_path):
    path, _ = clip_file
    got = run(tmp_path, "--classes", "cat,sky", "--clip-weights", path, "--no-quick-gelu")
    tower = text_mod.build_text_model("cascade-tiny", path, quick_gelu=False)
    expected = text_mod.encode_class_names(tower, ["cat", "sky"], "single", clip_model="cascade-tiny")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, run(tmp_path, "--classes", "cat,sky", "--clip-weights", path))
