"""``cascade-clip predict`` on images written here: sizes, indices, overlays, JSON, bad input, official checkpoints.

A tiny random model (``cascade-tiny``, 64 px crops) keeps this fast; its masks are noise, which is fine: the tests
check the pipeline (sizes, ranges, files, calibration, errors), not segmentation quality.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_clip import CascadeCLIP, ModelConfig, predict
from cascade_clip.checkpoint import save_model_checkpoint
from cascade_clip.clip_arch import create_clip
from cascade_clip.visualize import class_palette, generated_palette, label_image

TINY = dict(clip_model="cascade-tiny", img_size=64, crop_size=64, stride=48, num_prompt_tokens=4, decoder_heads=4,
            decoder_ffn_dim=256)
CLASSES = "cat,dog,grass,sky"

# name -> (PIL mode, width, height): RGB, grayscale, RGBA, non-square, tiny, larger than the crop
IMAGES = {"rgb": ("RGB", 80, 64), "gray": ("L", 40, 30), "rgba": ("RGBA", 70, 50), "wide": ("RGB", 150, 33),
          "tiny": ("RGB", 5, 7), "large": ("RGB", 200, 150)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(3)
    clip_path = root / "tiny_clip.pt"
    torch.save(create_clip("cascade-tiny").state_dict(), clip_path)
    model = CascadeCLIP(ModelConfig.preset("voc", clip_pretrained=str(clip_path), **TINY))
    ckpt = root / "tiny.pt"
    save_model_checkpoint(str(ckpt), model)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (mode, width, height) in IMAGES.items():
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else None)
        Image.fromarray(array, mode=mode).save(images / f"{name}.png")
    return root, str(ckpt), str(clip_path), images


def run_predict(setup, *args, short_side="80"):
    root, ckpt, _, _ = setup
    predict.main(["--checkpoint", ckpt, "--classes", CLASSES, "--short-side", short_side, "--cache-dir",
                  str(root / "cache"), "--no-progress", *args])


def check_outputs(out, names, num_classes):
    for name in names:
        _, width, height = IMAGES[name]
        labels = Image.open(out / f"{name}.png")
        assert labels.mode == "P" and labels.size == (width, height)
        indices = np.asarray(labels)
        assert indices.min() >= 0 and indices.max() < num_classes
        overlay = Image.open(out / f"{name}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width > width and overlay.height >= height


def test_predict_writes_label_pngs_overlays_and_json(setup, tmp_path, capsys):
    _, _, _, images = setup
    out = tmp_path / "out"
    run_predict(setup, str(images), "--out", str(out), "--json", str(tmp_path / "areas.json"))
    check_outputs(out, IMAGES, 4)
    report = json.loads((tmp_path / "areas.json").read_text())
    assert report["classes"] == CLASSES.split(",") and report["skipped"] == []
    assert len(report["images"]) == len(IMAGES)
    for record in report["images"]:
        assert sum(record["areas"].values()) == pytest.approx(1.0)
        assert sum(record["pixels"].values()) == record["width"] * record["height"]
        labels = np.asarray(Image.open(record["labels"]))
        for name, count in record["pixels"].items():  # the printed areas are those of the written PNG
            assert (labels == CLASSES.split(",").index(name)).sum() == count
    assert "rgb.png (80x64)" in capsys.readouterr().out


def test_original_scale_with_several_windows(setup, tmp_path):
    _, _, _, images = setup
    out = tmp_path / "out"
    run_predict(setup, str(images / "large.png"), str(images / "wide.png"), "--out", str(out), short_side="0")
    check_outputs(out, ["large", "wide"], 4)


def test_bf16_precision(setup, tmp_path, capsys):
    _, _, _, images = setup
    out = tmp_path / "out"
    run_predict(setup, str(images / "rgb.png"), "--out", str(out), "--precision", "bf16")
    check_outputs(out, ["rgb"], 4)


def test_unreadable_files_are_reported_and_skipped(setup, tmp_path, capsys):
    _, _, _, images = setup
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.png").write_text("not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    Image.open(images / "rgb.png").save(folder / "good.jpg")
    with pytest.raises(SystemExit) as exit_info:
        run_predict(setup, str(folder), str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "out"))
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.out and "missing.jpg" in captured.err
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "broken.png").exists()


def test_official_checkpoint_with_text_encoder(setup, tmp_path):
    root, _, clip_path, images = setup
    # An official-layout file: 10 prompt tokens (recognised as the VOC preset), text_encoder.* inside, no config.
    torch.manual_seed(4)
    overrides = {**TINY, "num_prompt_tokens": 10}
    model = CascadeCLIP(ModelConfig.preset("voc", **overrides))
    text_state = {"text_encoder." + k: v for k, v in torch.load(clip_path).items() if not k.startswith("visual.")}
    official = root / "official.pth"
    torch.save({"meta": {}, "state_dict": {**model.official_state_dict(), **text_state}}, official)
    ours = root / "ours_same_weights.pt"
    save_model_checkpoint(str(ours), model)

    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    common = ["--classes", CLASSES, "--short-side", "80", "--no-cache", "--no-progress", str(images / "rgb.png")]
    predict.main(["--checkpoint", str(official), *sets, *common, "--out", str(tmp_path / "official")])
    predict.main(["--checkpoint", str(ours), "--clip-weights", clip_path, *common, "--out", str(tmp_path / "ours")])
    check_outputs(tmp_path / "official", ["rgb"], 4)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "official" / "rgb.png")),
                                  np.asarray(Image.open(tmp_path / "ours" / "rgb.png")))


def test_checkpoint_does_not_need_its_clip_weights_file(setup, tmp_path):
    _, _, _, images = setup
    torch.manual_seed(5)
    model = CascadeCLIP(ModelConfig.preset("voc", **TINY))
    model.cfg.clip_pretrained = str(tmp_path / "gone" / "clip.pt")  # trained elsewhere: the file is not here
    ckpt = tmp_path / "moved.pt"
    save_model_checkpoint(str(ckpt), model)
    npy = tmp_path / "text.npy"
    np.save(npy, np.eye(4, 64, dtype=np.float32))
    predict.main(["--checkpoint", str(ckpt), "--classes", CLASSES, "--text-embeddings", str(npy), "--short-side", "64",
                  "--no-progress", str(images / "rgb.png"), "--out", str(tmp_path / "out")])
    check_outputs(tmp_path / "out", ["rgb"], 4)


def test_calibration_follows_the_checkpoint_seen_classes(setup):
    from cascade_clip import Segmenter

    _, ckpt, _, images = setup
    kwargs = dict(short_side=64, cache_dir=None)
    auto = Segmenter.from_checkpoint(ckpt, "cat,dog,sofa", **kwargs)  # VOC: cat, dog seen; sofa unseen
    assert auto.seen == (0, 1)
    assert Segmenter.from_checkpoint(ckpt, "cat,dog,sofa", seen=["sofa"], **kwargs).seen == (2,)
    plain = Segmenter.from_checkpoint(ckpt, "cat,dog,sofa", calibration=False, **kwargs)
    assert plain.seen == ()
    image = Image.open(images / "rgb.png")
    difference = plain(image).scores - auto(image).scores
    torch.testing.assert_close(difference[:2], torch.full_like(difference[:2], 0.1))
    torch.testing.assert_close(difference[2], torch.zeros_like(difference[2]))
    with pytest.raises(ValueError, match="not in the class list"):
        Segmenter.from_checkpoint(ckpt, "cat,dog", seen=["sheep"], **kwargs)
    # the checkpoint's own preset: its seen classes; another dataset's preset: cross-dataset, nothing calibrated (as the
    # official coco2voc/coco2context configs and `cascade-clip eval`), unless asked
    assert Segmenter.from_checkpoint(ckpt, "voc", **kwargs).seen == tuple(range(15))
    assert Segmenter.from_checkpoint(ckpt, "context", **kwargs).seen == ()
    assert Segmenter.from_checkpoint(ckpt, "context", seen=["cat"], **kwargs).seen == (14,)  # "cat" is row 14 of Context


@pytest.mark.parametrize(
    "args, message",
    [(["--classes", "cat,cat"], "duplicate class names"),
     (["--classes", CLASSES, "--set", "decoder_ffn_dim=128"], "does not match the model configuration"),
     (["--classes", CLASSES, "--set", "no_such_field=1"], "no_such_field"),
     (["--classes", "VOC"], "the presets are voc, context, coco (lower case)"),
     (["--classes", "sky,Sky"], "duplicate class names (compared without case and spacing)"),
     (["--classes", "fire hydrant,fire  hydrant"], "duplicate class names"),
     (["--classes", "myclasses.lst"], "class file not found: myclasses.lst"),
     (["--classes", CLASSES, "--set", "crop_size=abc"], "crop_size"),
     (["--classes", CLASSES, "--stride", "0"], "--stride must be > 0, got 0"),
     (["--classes", CLASSES, "--crop-size", "0"], "--crop-size must be > 0, got 0"),
     (["--classes", CLASSES, "--device", "bogus"], "--device 'bogus': not a torch device"),
     (["--classes", CLASSES, "--seen", "cat", "--no-calibration"], "pass one")],
)
def test_setup_errors_are_clear(setup, tmp_path, capsys, args, message):
    root, ckpt, _, images = setup
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", ckpt, *args, "--no-cache", "--no-progress", str(images / "rgb.png"),
                      "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "configuration" in message:
        assert ckpt in err  # names the file


def test_crop_size_alone_keeps_the_official_overlap_and_model_prefix(setup):
    """--crop-size without --stride takes 426/512 of it (the checkpoint's 48 would exceed a 32 crop); eval's
    `--set model.FIELD=VALUE` spelling works in predict too."""
    from cascade_clip.predict import build_parser, build_segmenter

    root, ckpt, _, _ = setup
    args = build_parser().parse_args(["--checkpoint", ckpt, "--classes", CLASSES, "--crop-size", "32", "--no-cache",
                                      "--set", "model.decoder_dropout=0.0", str(root), "--out", str(root / "o")])
    seg = build_segmenter(args)
    assert (seg.model.cfg.crop_size, seg.model.cfg.stride, seg.model.cfg.decoder_dropout) == (32, 26, 0.0)
    for explicit in (["--set", "stride=20"], ["--set", "model.stride=20"], ["--stride", "20"]):  # an explicit stride wins
        args = build_parser().parse_args(["--checkpoint", ckpt, "--classes", CLASSES, "--crop-size", "32",
                                          "--no-cache", *explicit, str(root), "--out", str(root / "o")])
        assert build_segmenter(args).model.cfg.stride == 20, explicit


def test_class_file_with_a_byte_order_mark(tmp_path):
    from cascade_clip.class_list import parse_classes

    path = tmp_path / "classes.txt"
    path.write_bytes("sky\nroad\n".encode("utf-8-sig"))
    assert parse_classes(str(path)).names == ("sky", "road")


def test_text_embeddings_file_rows_must_match_classes(setup, tmp_path, capsys):
    _, _, _, images = setup
    npy = tmp_path / "three.npy"
    np.save(npy, np.eye(3, 64, dtype=np.float32))
    with pytest.raises(SystemExit):
        run_predict(setup, "--text-embeddings", str(npy), str(images / "rgb.png"), "--out", str(tmp_path))
    assert "3 text embeddings for 4 class names" in capsys.readouterr().err
    np.save(npy, np.eye(4, 64, dtype=np.float32))
    run_predict(setup, "--text-embeddings", str(npy), str(images / "tiny.png"), "--out", str(tmp_path / "out"))
    check_outputs(tmp_path / "out", ["tiny"], 4)


def test_palettes_and_wide_class_lists():
    from cascade_clip.catalog import dataset_info

    voc = dataset_info("voc")
    assert class_palette(["cat", "dog"]) == [voc.palette[7], voc.palette[11]]  # dataset colours when they exist
    generated = class_palette(["cat", "zebra crossing"])
    assert len(set(generated)) == 2
    assert len(set(generated_palette(60))) == 60
    wide = label_image(np.full((3, 4), 300), generated_palette(400))  # > 256 classes: 16-bit indices
    assert np.asarray(wide).max() == 300


def test_exif_rotated_photo_is_segmented_upright(setup, tmp_path):
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to display) is segmented as it is
    displayed: the label PNG and the overlay have the upright size. Dataset reading keeps the stored pixels."""
    from cascade_clip.image_io import read_rgb

    stored = np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)  # stored 70 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(photo, exif=exif)
    assert read_rgb(str(photo)).shape == (40, 70, 3)
    upright = read_rgb(str(photo), upright=True)
    assert upright.shape == (70, 40, 3)
    decoded = read_rgb(str(photo))
    np.testing.assert_array_equal(upright, np.rot90(decoded, k=-1))  # clockwise quarter turn of the stored pixels
    out = tmp_path / "out"
    run_predict(setup, str(photo), "--out", str(out))
    assert Image.open(out / "photo.png").size == (40, 70)  # (width, height) as displayed


def test_progress_off_a_terminal_prints_lines(capsys):
    """A log file gets one line per item, not tqdm's carriage-return bars."""
    from cascade_clip.progress import Progress

    assert list(Progress(["a.jpg", "b.jpg"], total=2, desc="predict")) == ["a.jpg", "b.jpg"]
    err = capsys.readouterr().err
    assert err.splitlines() == ["[1/2] a.jpg", "[2/2] b.jpg"] and "\r" not in err


def test_output_names_never_collide():
    stems = predict.output_stems(["a/x.png", "b/x.png", "c/x_2.png", "y.png", "y_overlay.png", "A.png", "a.jpg"])
    assert stems == ["x", "x_2", "x_2_2", "y", "y_overlay_2", "A", "a_2"]
    files = [name for stem in stems for name in (stem + ".png", stem + "_overlay.png")]
    assert len({f.casefold() for f in files}) == len(files)


def test_outputs_never_overwrite_inputs(setup, tmp_path, capsys):
    """--out as the input folder, or outputs landing on an input image, are refused before any work (the originals
    would be lost and the next run would segment its own outputs)."""
    _, _, _, images = setup
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(images / "rgb.png").save(folder / "photo.png")
    before = (folder / "photo.png").read_bytes()
    for args, message in (([str(folder), "--out", str(folder)], "is the input folder"),
                          ([str(folder / "photo.png"), "--out", str(folder)], "would overwrite the input image"),
                          ([str(folder / "photo.png"), "--out", str(tmp_path / "o"), "--json", str(tmp_path)],
                           "is a folder")):
        with pytest.raises(SystemExit) as exit_info:
            run_predict(setup, *args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (folder / "photo.png").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["photo.png"]


def test_a_failed_write_skips_that_image_only(setup, tmp_path, capsys):
    """An output that cannot be written (here a folder in the way of one overlay) costs that image, not the batch:
    its label PNG is removed again (outputs come in pairs), the others are written and the JSON lists the failure."""
    _, _, _, images = setup
    out = tmp_path / "out"
    (out / "gray_overlay.png").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        run_predict(setup, str(images / "gray.png"), str(images / "rgb.png"), "--out", str(out), "--json",
                    str(tmp_path / "report.json"))
    assert exit_info.value.code == 1
    assert not (out / "gray.png").exists() and (out / "rgb.png").is_file() and (out / "rgb_overlay.png").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["image"] for r in report["images"]] == [str(images / "rgb.png")]
    assert [r["image"] for r in report["skipped"]] == [str(images / "gray.png")]
    assert not list(out.glob("*.tmp"))


def test_save_only_formats_are_not_inputs(tmp_path):
    for name in ("doc.pdf", "data.h5", "photo.jpg"):
        (tmp_path / name).write_bytes(b"")
    files, _ = predict.collect_inputs([str(tmp_path)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["photo.jpg"]
    assert ".pdf" not in predict.image_extensions() and ".png" in predict.image_extensions()


def test_an_input_reached_under_another_name_is_not_overwritten(setup, tmp_path, capsys):
    """Identity, not spelling: a hard link stands in for the second name a case-insensitive file system gives a file
    (out/Cat.PNG read as input, out/Cat.png written)."""
    _, _, _, images = setup
    out = tmp_path / "out"
    out.mkdir()
    Image.open(images / "rgb.png").save(out / "real.png")
    (tmp_path / "elsewhere").mkdir()
    os.link(out / "real.png", tmp_path / "elsewhere" / "real.png")  # the same file under another path
    with pytest.raises(SystemExit) as exit_info:
        run_predict(setup, str(tmp_path / "elsewhere" / "real.png"), "--out", str(out))
    assert exit_info.value.code == 2 and "would overwrite the input image" in capsys.readouterr().err
