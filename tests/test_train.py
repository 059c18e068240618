"""Training end to end at tiny size: configs, resume after a kill -9 equals an uninterrupted run, bad input, load-from +
transductive, and the eval command (metrics JSON, palette predictions, cross-dataset)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_clip import config_cli, evaluate, train
from cascade_clip.quickstart import quickstart_overrides
from cascade_clip.synthetic import SyntheticSpec, write_voc_layout
from cascade_clip.train_config import preset, resolve

SPEC = SyntheticSpec(train_images=8, val_images=3, min_side=40, max_side=56)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(data_root, work_dir, iters=8):
    """The quickstart job shrunk to 32 px, batch 2, no dropout (so runs are comparable across processes)."""
    return quickstart_overrides(data_root, work_dir, iters, SPEC) + [
        "model.img_size=32", "model.crop_size=32", "model.stride=27", "data.scale=128,32", "eval.short_side=32",
        "train.batch_size=2", "model.prompt_dropout=0.0", "model.decoder_dropout=0.0", "train.eval_at_start=false",
        "train.eval_at_end=false", "train.log_interval=1", "train.checkpoint_interval=2", "train.kernels=reference",
        "data.text_embeddings=none",  # the random text tower drawn from a fixed seed
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_voc_layout(root, SPEC)
    return root


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_presets_and_overrides(capsys):
    voc = preset("voc")
    assert (voc.train.iters, voc.train.batch_size, voc.optim.lr, voc.optim.weight_decay) == (20000, 4, 2e-4, 0.01)
    assert (voc.optim.warmup_iters, voc.optim.warmup_ratio, voc.optim.min_lr, voc.optim.power) == (1500, 1e-6, 1e-6, 0.9)
    assert voc.data.train_split == "train+aug" and voc.model.num_prompt_tokens == 10 and not voc.train.transductive
    st = preset("voc-st")
    assert st.train.transductive and st.train.iters == 10000 and st.train.batch_size == 8 and st.model.seen_calibration == 0
    assert preset("coco").model.num_prompt_tokens == 50 and preset("context-st").train.iters == 20000
    cfg = resolve("voc", ["model.img_size=64", "model.clip_model=cascade-tiny", "train.iters=7", "train.batch_size=3",
                          "train.checkpoint_interval=5"], data_root="/d", work_dir="/w", text_embeddings="t.npy")
    assert (cfg.model.img_size, cfg.model.clip_model, cfg.train.iters, cfg.train.batch_size) == (64, "cascade-tiny", 7, 3)
    assert (cfg.data.root, cfg.train.work_dir, cfg.data.text_embeddings, cfg.train.checkpoint_interval) == ("/d", "/w", "t.npy", 5)
    with pytest.raises(ValueError, match="unknown config key 'train.iterz'"):
        resolve("voc", ["train.iterz=3"])
    with pytest.raises(ValueError, match="train.iters: expected int"):
        resolve("voc", ["train.iters=many"])
    assert preset("voc").eval.precision == "fp32"  # in-training evaluations as `cascade-clip eval`, whatever train.precision
    assert resolve("voc", ["eval.precision=bf16"]).eval.precision == "bf16"
    with pytest.raises(ValueError, match="eval.precision must be bf16, fp16 or fp32, got 'fp8'"):
        resolve("voc", ["eval.precision=fp8"])
    shown = json.loads(config_cli.main(["show", "--config", "coco-st", "--set", "train.iters=9"]))
    assert shown["train"]["iters"] == 9 and shown["train"]["transductive"] and shown["model"]["clip_model"] == "ViT-B-16"


@pytest.mark.parametrize("override, message", [
    ("train.log_interval=0", "train.log_interval must be > 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("optim.power=-1", "optim.power must be >= 0"),
    ("optim.min_lr=1", "optim.min_lr must be in"),
    ("eval.short_side=0", "eval.short_side must be > 0"),
    ("model.stride=600", "0 < stride <= crop_size"),
])
def test_values_that_would_train_wrongly_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        resolve("voc", [override])


def test_grad_clip_zero_means_off():
    assert resolve("voc", ["optim.grad_clip=0"]).optim.grad_clip == 0


def test_transductive_training_with_the_seen_calibration_warns():
    with pytest.warns(UserWarning, match="model.seen_calibration=0 to match them"):
        resolve("voc", ["train.transductive=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve("voc-st")


def test_keep_checkpoints_ignores_an_earlier_runs_later_files(data_root, tmp_path):
    """keep_checkpoints=1 in a folder where a longer run left iter_100.pt: this run's newest file stays (the stale
    one neither counts nor is removed), its older files go."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "iter_100.pt").write_bytes(b"an earlier run's checkpoint")
    args = tiny_overrides(data_root, str(work), iters=4) + ["train.keep_checkpoints=1"]
    train.main(["--config", "voc", *sum((["--set", o] for o in args), [])])
    assert sorted(p.name for p in work.glob("iter_*.pt")) == ["iter_100.pt", "iter_4.pt"]
    assert torch.load(work / "latest.pt", weights_only=False)["iteration"] == 4


def test_a_checkpoint_that_cannot_be_written_stops_the_run(data_root, tmp_path, monkeypatch):
    from cascade_clip import train_state

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_state, "save_model_checkpoint", full_disk)
    work = str(tmp_path / "w")
    with pytest.raises(RuntimeError, match="checkpoint at iteration 2 could not be written.*No space left"):
        train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, work, iters=4)), [])])


def test_saved_config_file_is_checked(tmp_path):
    """A JSON config (--config FILE.json) with a misspelt section or a fractional integer is an error, not ignored
    or truncated."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"trian": {"iters": 5}}))
    with pytest.raises(ValueError, match=r"unknown config sections \['trian'\]"):
        resolve(str(path))
    path.write_text(json.dumps({"train": {"iters": 7.9}}))
    with pytest.raises(ValueError, match="iters: expected an integer, got 7.9"):
        resolve(str(path))
    full = preset("voc").to_dict()
    full["train"]["iters"] = 7.0
    path.write_text(json.dumps(full))
    assert resolve(str(path)).train.iters == 7


_DYING = textwrap.dedent(
    """
    import os, signal, sys, torch
    real_save = torch.save
    calls = [0]
    def dying_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the third checkpoint: write part of it, then die like kill -9
            f.write(b"PK partial checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = dying_save
    from cascade_clip.train import main
    main(sys.argv[1:])
    """
)


_ADAMW_SHAPES = ((7, 5), (13,), (1,), (3, 1, 11))
_ADAMW_GRADS = [[torch.randn(s, generator=torch.Generator().manual_seed(100 * i + j)) for j, s in enumerate(_ADAMW_SHAPES)]
                for i in range(12)]


_ADAMW_FLAGS = {"fused": (True, None), "foreach": (None, True), "for-loop": (None, False)}  # (fused, foreach)


def _adamw_run(implementation, steps, start_state=None, grad_scaler=False):
    """AdamW updates with the official values and schedule on fixed odd-sized parameters, gradients
    ``_ADAMW_GRADS[first:first + steps]`` (first = the steps already in ``start_state``), resumed as train.py does;
    with ``grad_scaler`` the steps go through an fp16-style GradScaler (gradients scaled by a power of two, so the
    update is the same). Returns the parameters, the optimiser and scheduler states, and the optimiser's flags."""
    from cascade_clip.schedule import build_optimizer, build_scheduler, load_optimizer_state

    cfg = dataclasses.replace(preset("voc").optim, implementation=implementation, warmup_iters=3)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in _ADAMW_SHAPES]
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_iters=len(_ADAMW_GRADS))
    scaler = torch.amp.GradScaler("cpu", enabled=grad_scaler)
    first = 0
    if start_state is not None:
        with torch.no_grad():
            for p, value in zip(params, start_state["params"]):
                p.copy_(value)
        load_optimizer_state(optimizer, start_state["optimizer"], cfg)
        scheduler.load_state_dict(start_state["scheduler"])
        first = start_state["steps"]
    flags = (optimizer.param_groups[0]["fused"], optimizer.param_groups[0]["foreach"])
    for grads in _ADAMW_GRADS[first : first + steps]:
        for p, grad in zip(params, grads):
            p.grad = scaler.scale(grad.clone())  # the identity when the scaler is off
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return {"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "steps": first + steps, "flags": flags}


def test_adamw_implementations_give_the_same_update():
    """optim.implementation (fused by default) only picks torch's kernel: fused, foreach and the for-loop AdamW (what
    mmcv ran) give the same parameters up to float32 round-off; a run resumed from another implementation's state
    (or from a state without the flags, as written before the setting existed) continues with the configured one,
    through a GradScaler too (fp16 training)."""
    from cascade_clip.train_state import config_differences

    assert preset("voc").optim.implementation == "fused"
    loop = _adamw_run("for-loop", 12)
    assert loop["flags"] == _ADAMW_FLAGS["for-loop"]
    for implementation in ("fused", "foreach"):
        other = _adamw_run(implementation, 12)
        assert other["flags"] == _ADAMW_FLAGS[implementation]
        for a, b in zip(other["params"], loop["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # lr 2e-4: 1e-6 is 0.5% of one step
    for saved, resumed_with in (("fused", "for-loop"), ("for-loop", "fused"), ("foreach", "fused"), ("fused", "foreach"),
                                ("old", "fused")):
        for grad_scaler in (False, True):
            half = _adamw_run("for-loop" if saved == "old" else saved, 6, grad_scaler=grad_scaler)
            if saved == "old":  # a state dict from before optim.implementation: torch's defaults, no flags chosen
                half["optimizer"]["param_groups"] = [{**g, "fused": None, "foreach": None}
                                                     for g in half["optimizer"]["param_groups"]]
            resumed = _adamw_run(resumed_with, 6, start_state=half, grad_scaler=grad_scaler)
            assert resumed["flags"] == _ADAMW_FLAGS[resumed_with], (saved, resumed_with)
            for a, b in zip(resumed["params"], loop["params"]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="optim.implementation must be one of fused, foreach, for-loop, got 'adam'"):
        resolve("voc", ["optim.implementation=adam"])
    stored, current = preset("voc").to_dict(), resolve("voc", ["optim.implementation=foreach"]).to_dict()
    assert config_differences(stored, current) == []


def test_kill_9_then_resume_equals_uninterrupted(data_root, tmp_path):
    whole = str(tmp_path / "whole")
    killed = str(tmp_path / "killed")
    train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, whole)), [])])

    args = ["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, killed)), [])]
    proc = subprocess.run([sys.executable, "-c", _DYING, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    files = sorted(os.listdir(killed))
    assert "iter_2.pt" in files and "iter_4.pt" in files and "iter_6.pt" not in files
    assert any(f.startswith(".tmp-") for f in files)  # the half-written file is hidden, never a checkpoint name
    for name in ("iter_2.pt", "iter_4.pt", "latest.pt"):
        torch.load(os.path.join(killed, name), map_location="cpu", weights_only=False)  # complete files only
    assert torch.load(os.path.join(killed, "latest.pt"), weights_only=False)["iteration"] == 4

    result = train.main(args + ["--resume", "auto"])
    assert result["iteration"] == 8
    assert not any(f.startswith(".tmp-") for f in os.listdir(killed))
    a, b = _weights(os.path.join(whole, "latest.pt")), _weights(os.path.join(killed, "latest.pt"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # --resume with another configuration is refused, naming the key
    with pytest.raises(ValueError, match=r"(?s)another configuration.*train\.iters: 8 \(checkpoint\) vs 9"):
        train.main(args + ["--set", "train.iters=9", "--resume", os.path.join(killed, "latest.pt")])
    # metrics.jsonl has one loss per step, also in the resumed run (the killed run's records after its checkpoint
    # are dropped before they are logged again)
    for work in (whole, killed):
        losses = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
        assert [r["iter"] for r in losses if "loss" in r] == list(range(1, 9)), work
    # resuming a finished run evaluates it again, in place of its earlier final evaluation (no duplicate)
    train.main(args + ["--set", "train.eval_at_end=true", "--resume", "auto"])
    train.main(args + ["--set", "train.eval_at_end=true", "--resume", "auto"])
    records = [json.loads(line) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert [r["iter"] for r in records if r.get("eval") == "after training"] == [8]
    train.main(args + ["--resume", "auto"])  # without a final evaluation: the earlier one is kept
    records = [json.loads(line) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert [r["iter"] for r in records if r.get("eval") == "after training"] == [8]

    # a checkpoint written by another number of processes is refused (batch and sample order would change)
    state = torch.load(os.path.join(killed, "iter_4.pt"), weights_only=False)
    assert state["world_size"] == 1
    state["world_size"] = 2
    torch.save(state, tmp_path / "two_ranks.pt")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1"):
        train.main(args + ["--resume", str(tmp_path / "two_ranks.pt")])


def test_loss_ignores_ignore_pixels_reaches_the_training_loss(data_root, tmp_path, monkeypatch):
    """model.loss_ignores_ignore_pixels=true (the README's documented deviation) is the loss training computes: each
    step's loss terms are those without the 255 pixels, which differ from the official terms on these labels."""
    from cascade_clip import loss as loss_mod

    real = loss_mod.loss_terms
    calls = []

    def spy(mask_logits, labels, **kwargs):
        terms = real(mask_logits, labels, **kwargs)
        calls.append((mask_logits.detach().clone(), labels.clone(), {k: v.detach().clone() for k, v in terms.items()}))
        return terms

    monkeypatch.setattr(loss_mod, "loss_terms", spy)  # train imports it from cascade_clip.loss when it runs
    args = tiny_overrides(data_root, str(tmp_path / "w"), iters=1) + ["model.loss_ignores_ignore_pixels=true"]
    train.main(["--config", "voc", *sum((["--set", o] for o in args), [])])
    assert calls, "training computed no loss through cascade_clip.loss.loss_terms"
    for logits, labels, terms in calls:
        assert (labels == 255).any()  # unseen classes and padding: the flag matters on this batch
        kept = real(logits, labels, ignore_pixels=True, backend="reference")
        official = real(logits, labels, ignore_pixels=False, backend="reference")
        for key in ("focal", "dice", "masks"):
            torch.testing.assert_close(terms[key], kept[key], msg=key)
        assert not torch.allclose(official["focal"], kept["focal"])


def test_gradient_accumulation_equals_the_larger_batch(data_root, tmp_path):
    """batch 2 x grad_accum 2 trains to the weights of batch 4 (the same four images per step, dropout off), with the
    same logged losses: the micro-batches are normalised as one batch."""
    runs = {}
    for name, extra in (("accum", ["train.batch_size=2", "train.grad_accum=2"]), ("batch", ["train.batch_size=4"])):
        work = str(tmp_path / name)
        args = tiny_overrides(data_root, work, iters=3) + extra + ["optim.warmup_iters=1"]
        runs[name] = (train.main(["--config", "voc", *sum((["--set", o] for o in args), [])]), _weights(
            os.path.join(work, "latest.pt")))
    (accum, a), (batch, b) = runs["accum"], runs["batch"]
    for key in a:
        noise_only = key.endswith("multihead_attn.k.bias") and ".layers.2." not in key  # as in test_ddp
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3 if noise_only else 2e-5, msg=key)
    torch.testing.assert_close([l for _, l in accum["losses"]], [l for _, l in batch["losses"]], rtol=1e-5, atol=0)


def test_resume_after_the_clip_file_moved(data_root, tmp_path):
    """The checkpoint holds every weight: resuming neither reads the CLIP file again nor requires its old path."""
    from cascade_clip.clip_arch import create_clip

    clip = tmp_path / "clip.pt"
    torch.manual_seed(3)
    torch.save(create_clip("cascade-tiny").state_dict(), clip)
    work = str(tmp_path / "w")
    args = ["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, work, iters=4)), []),
            "--set", f"model.clip_pretrained={clip}"]
    train.main(args)
    uninterrupted = _weights(os.path.join(work, "iter_4.pt"))
    moved = tmp_path / "moved.pt"
    clip.rename(moved)
    resumed = [a.replace(str(clip), str(moved)) for a in args]
    with pytest.raises(ValueError, match="train.iters"):  # another length of run is still another configuration
        train.main(resumed + ["--set", "train.iters=5", "--resume", os.path.join(work, "iter_2.pt")])
    train.main(resumed + ["--resume", os.path.join(work, "iter_2.pt")])
    raw = torch.load(os.path.join(work, "iter_4.pt"), weights_only=False)
    assert raw["model_config"]["clip_pretrained"] == str(moved)  # later commands embed new class names with it
    for key, value in uninterrupted.items():
        assert torch.equal(raw["model"][key], value), key


def test_bad_input_leaves_an_existing_run_untouched(data_root, tmp_path):
    """A run that fails on its inputs does not overwrite the work dir's config.json nor its metrics.jsonl."""
    work = tmp_path / "w"
    train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, str(work), iters=2)), [])])
    before = {name: (work / name).read_text() for name in ("config.json", "metrics.jsonl")}
    bad = tiny_overrides(str(tmp_path / "missing"), str(work), iters=5)
    with pytest.raises(ValueError, match="missing"):
        train.main(["--config", "voc", *sum((["--set", o] for o in bad), [])])
    assert {name: (work / name).read_text() for name in before} == before
    fresh = tmp_path / "never_made"
    with pytest.raises(ValueError, match="missing"):
        train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(str(tmp_path / "missing"),
                                                                                  str(fresh), iters=5)), [])])
    assert not fresh.exists()  # no empty work dir left behind either


def test_text_embedding_file_shape_mismatch(data_root, tmp_path):
    bad = tmp_path / "text.npy"
    np.save(bad, np.ones((5, 64), np.float32))  # 6 classes in the synthetic set
    args = ["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, str(tmp_path / "w"))), [])]
    with pytest.raises(ValueError, match=r"text\.npy: 5 text embeddings \(shape \(5, 64\)\) for 6 classes"):
        train.main(args + ["--text-embeddings", str(bad)])
    np.save(bad, np.ones((6, 32), np.float32))
    with pytest.raises(ValueError, match=r"text\.npy: embeddings are 32 wide, the model needs 64"):
        train.main(args + ["--text-embeddings", str(bad)])
    with pytest.raises(ValueError, match="data root not found"):
        train.main(args + ["--data-root", str(tmp_path / "missing")])


def test_load_from_transductive_and_eval(data_root, tmp_path):
    inductive = str(tmp_path / "inductive")
    overrides = tiny_overrides(data_root, inductive, iters=2)
    train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])
    ckpt = os.path.join(inductive, "latest.pt")

    st = str(tmp_path / "st")
    st_overrides = tiny_overrides(data_root, st, iters=2) + ["train.transductive=true", "model.seen_calibration=0.0",
                                                              "train.eval_at_end=true"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train.main(["--config", "voc", "--load-from", ckpt, *sum((["--set", o] for o in st_overrides), [])])
    assert not [w for w in caught if "without --load-from" in str(w.message)]
    assert all(np.isfinite(loss) for _, loss in result["losses"])
    assert result["metrics"]["mIoU"] is not None
    raw = torch.load(os.path.join(st, "latest.pt"), weights_only=False)
    assert raw["train_config"]["train"]["transductive"] and raw["iteration"] == 2
    # eval without --short-side/--split tests at the checkpoint's own eval settings (here 32 px, not the official
    # 512): the metrics printed at the end of training are those eval gives
    again = evaluate.main(["--checkpoint", os.path.join(st, "latest.pt"), "--data-root", data_root, "--kernels",
                           "reference", "--num-workers", "0"])
    assert again["per_class"] == pytest.approx(result["metrics"]["per_class"], nan_ok=True)
    assert again["aAcc"] == pytest.approx(result["metrics"]["aAcc"])

    out = tmp_path / "metrics.json"
    preds = tmp_path / "preds"
    metrics = evaluate.main(["--checkpoint", ckpt, "--data-root", data_root, "--out", str(out), "--save-preds",
                             str(preds), "--kernels", "reference", "--num-workers", "0"])
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(metrics))
    assert set(stored) >= {"mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "aAcc", "per_class"}
    assert list(stored["per_class"]) == list(SPEC.class_names)
    names = sorted(os.listdir(preds))
    assert names == [f"val_{i:05d}.png" for i in range(SPEC.val_images)]
    with Image.open(preds / names[0]) as png, Image.open(os.path.join(data_root, "VOCdevkit/VOC2012/JPEGImages/val_00000.jpg")) as img:
        assert png.mode == "P" and png.size == img.size  # original resolution
        assert np.asarray(png).max() < len(SPEC.class_names)


def test_transductive_resume_equals_uninterrupted(data_root, tmp_path):
    """A self-training run resumed from its iteration-2 checkpoint ends with the uninterrupted run's weights: the
    pseudo-labels come from the resumed model and RNG state, as they did in the run that wrote the checkpoint."""
    inductive = str(tmp_path / "inductive")
    train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, inductive, iters=2)), [])])

    def st_args(work):
        # dropout on (tiny_overrides turns it off): the only draws from the global RNG, so a resume that lost the
        # checkpoint's RNG state would end with other weights
        overrides = tiny_overrides(data_root, work, iters=4) + ["train.transductive=true", "model.seen_calibration=0.0",
                                                                 "model.prompt_dropout=0.1", "model.decoder_dropout=0.1"]
        return ["--config", "voc", *sum((["--set", o] for o in overrides), [])]

    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    train.main(st_args(whole) + ["--load-from", os.path.join(inductive, "latest.pt")])
    result = train.main(st_args(resumed) + ["--resume", os.path.join(whole, "iter_2.pt")])
    assert result["iteration"] == 4
    a, b = _weights(os.path.join(whole, "latest.pt")), _weights(os.path.join(resumed, "latest.pt"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_self_training_without_an_inductive_start_warns(data_root, tmp_path):
    """Pseudo-labels from an untrained head are noise: the -st stage is meant to start from --load-from."""
    overrides = tiny_overrides(data_root, str(tmp_path / "st"), iters=1) + ["train.transductive=true",
                                                                             "model.seen_calibration=0.0"]
    with pytest.warns(UserWarning, match=r"train.transductive=true without --load-from"):
        train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])


def test_eval_settings_default_to_the_checkpoints():
    raw = {"train_config": {"data": {"dataset": "voc", "val_split": "minival"}, "eval": {"short_side": 64}}}
    assert evaluate.evaluation_settings(raw, "voc") == ("minival", 64)
    assert evaluate.evaluation_settings(raw, "context") == ("val", 64)  # another dataset's layout: its val split
    assert evaluate.evaluation_settings(raw, "voc", split="val", short_side=512) == ("val", 512)
    assert evaluate.evaluation_settings({"official_state_dict": {}}, "voc") == ("val", 512)  # official: mmseg's test scale
    with pytest.raises(ValueError, match="--short-side must be > 0, got 0"):
        evaluate.evaluation_settings(raw, "voc", short_side=0)


def test_cross_dataset_eval(data_root, tmp_path):
    """A model evaluated on another dataset's layout and classes (like coco2context): all classes seen, no unseen."""
    work = str(tmp_path / "w")
    train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, work, iters=1)), [])])
    base = tmp_path / "ctx" / "VOCdevkit" / "VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        os.makedirs(base / sub)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(base / "JPEGImages/x.jpg")
    label = np.zeros((40, 50), np.uint8)
    label[10:30, 10:40] = 3
    Image.fromarray(label, mode="L").save(base / "SegmentationClassContext/x.png")
    (base / "ImageSets/SegmentationContext/val.txt").write_text("x\n")
    metrics = evaluate.main(["--checkpoint", os.path.join(work, "latest.pt"), "--dataset", "context", "--data-root",
                             str(tmp_path / "ctx"), "--kernels", "reference", "--num-workers", "0", "--short-side", "32"])
    assert len(metrics["per_class"]) == 59 and metrics["mIoU_unseen"] is None and metrics["hIoU"] is None
    assert metrics["mIoU"] is not None


def test_compiled_training_matches_eager(data_root, tmp_path):
    """train.compile=default (Inductor, here on the CPU with the C++ ops, which torch.compile traces as custom ops)
    gives the eager run's losses and weights; the checkpoint holds the plain module's keys."""
    runs = {}
    for mode in ("none", "default"):
        work = str(tmp_path / mode)
        overrides = tiny_overrides(data_root, work, iters=3) + [f"train.compile={mode}", "train.kernels=cpp"]
        train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])
        losses = [json.loads(line)["loss"] for line in open(os.path.join(work, "metrics.jsonl")) if '"loss"' in line]
        runs[mode] = (losses, _weights(os.path.join(work, "latest.pt")))
    (eager_losses, eager_w), (compiled_losses, compiled_w) = runs["none"], runs["default"]
    assert len(eager_losses) == len(compiled_losses) == 3
    # Inductor fuses and reorders float32 reductions: equal up to round-off, not bitwise
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    assert compiled_w.keys() == eager_w.keys() and not any("_orig_mod" in k for k in compiled_w)
    for key in eager_w:
        if key.endswith("multihead_attn.k.bias"):
            # a key bias before a softmax has an exact gradient of 0; both runs hold round-off (~1e-10) there, which
            # AdamW turns into steps of up to ~lr each, of either sign: bound the drift by 3 steps of the largest lr
            # (7.5e-5 here) instead of comparing noise
            assert (compiled_w[key] - eager_w[key]).abs().max() <= 3 * 7.5e-5, key
            continue
        torch.testing.assert_close(compiled_w[key], eager_w[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_compile_mode_is_validated(data_root, tmp_path):
    overrides = tiny_overrides(data_root, str(tmp_path / "bad"), iters=1) + ["train.compile=max-speed"]
    with pytest.raises(ValueError, match="train.compile must be one of none, default, reduce-overhead"):
        train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])


class _RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not a dependency)."""

    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _RecordingWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_training_and_evaluation_scalars(data_root, tmp_path, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_RecordingWriter))
    _RecordingWriter.instances.clear()
    work = str(tmp_path / "run")
    overrides = tiny_overrides(data_root, work, iters=2) + ["train.tensorboard=true", "train.eval_at_end=true"]
    train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])
    (writer,) = _RecordingWriter.instances
    assert writer.log_dir == os.path.join(work, "tb") and writer.closed
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert {("train/loss", 1), ("train/loss", 2), ("train/lr", 2), ("eval/mIoU", 2), ("eval/aAcc", 2)} <= tags
    assert all(np.isfinite(value) for _, value, _ in writer.scalars)
    assert not any(tag in ("train/iter", "train/iters", "eval/iter") for tag, _ in tags)  # steps, not scalars


def test_tensorboard_event_files(data_root, tmp_path):
    """With the real tensorboard package (optional; skipped where it is not installed): the scalars are on disk."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = str(tmp_path / "run")
    overrides = tiny_overrides(data_root, work, iters=2) + ["train.tensorboard=true", "train.eval_at_end=true"]
    train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])
    events = EventAccumulator(os.path.join(work, "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "eval/mIoU" in scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_eval_text_for_an_official_checkpoint(tmp_path):
    """An official checkpoint's class embeddings come from CLIP weights when given (`--set model.clip_pretrained`),
    else from its own text_encoder.*; with neither, a named error instead of a random text tower (predict's rule)."""
    from cascade_clip import CascadeCLIP, ModelConfig
    from cascade_clip.clip_arch import create_clip
    from cascade_clip.text import class_embeddings

    torch.manual_seed(0)
    clip_path = str(tmp_path / "clip.pt")
    torch.save(create_clip("cascade-tiny").state_dict(), clip_path)
    model = CascadeCLIP(ModelConfig.preset("voc", clip_model="cascade-tiny", img_size=64, num_prompt_tokens=10))
    raw = {"official_state_dict": model.official_state_dict(), "path": str(tmp_path / "official.pth")}
    names = ["cat", "dog"]
    got = evaluate.resolve_text(model, raw, names, path=None, templates=None, dataset="voc", clip_pretrained=clip_path)
    torch.testing.assert_close(got, class_embeddings(names, clip_model="cascade-tiny", pretrained=clip_path,
                                                     templates="single", cache_dir=None))
    with pytest.raises(ValueError, match="no text_encoder.* weights and no clip_pretrained"):
        evaluate.resolve_text(model, raw, names, path=None, templates=None, dataset="voc")


def test_cli_prints_user_errors_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_CLIP_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "cascade_clip.cli", "train", "--set", "train.iter=5"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("cascade-clip train: error: unknown config key 'train.iter'"), proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config file .*bad.json"):
        resolve(str(bad))


def test_training_without_clip_weights_warns(data_root, tmp_path, monkeypatch):
    """A real architecture without model.clip_pretrained would train on a random, frozen image tower."""
    monkeypatch.setattr(train, "TINY_MODEL_NAME", "another-tiny-model")  # cascade-tiny stands for a real one here
    with pytest.warns(UserWarning, match="model.clip_pretrained is not set"):
        train.main(["--config", "voc", *sum((["--set", o] for o in tiny_overrides(data_root, str(tmp_path), 1)), [])])


def test_backend_that_cannot_run_on_the_device_is_named():
    from cascade_clip import ops

    if "cpp" not in ops.available_backends():
        pytest.skip("the C++ extension is not built")
    assert ops.resolve("reference", torch.device("mps")).name == "reference"  # plain PyTorch runs anywhere
    with pytest.raises(ValueError, match="'cpp' ops backend runs on cpu tensors, these are on cuda"):
        ops.resolve("cpp", torch.device("cuda"))


def test_loader_workers_change_nothing_also_on_resume(data_root, tmp_path):
    """Augmentation draws come from (seed, epoch, image index), not from a worker's RNG: 2 loader processes train to
    the bits of 0, and a run resumed with another worker count continues exactly (the README's claim)."""
    def run(work, workers, *extra):
        args = tiny_overrides(data_root, str(tmp_path / work), iters=4) + [f"data.num_workers={workers}"]
        return train.main(["--config", "voc", *sum((["--set", o] for o in args), []), *extra])

    alone = run("alone", 0)
    forked = run("forked", 2)
    resumed = run("resumed", 2, "--resume", str(tmp_path / "alone" / "iter_2.pt"))
    assert [loss for _, loss in forked["losses"]] == [loss for _, loss in alone["losses"]]
    assert [loss for _, loss in resumed["losses"]] == [loss for _, loss in alone["losses"]][2:]
    expected = _weights(str(tmp_path / "alone" / "latest.pt"))
    for work in ("forked", "resumed"):
        got = _weights(str(tmp_path / work / "latest.pt"))
        assert all(torch.equal(got[k], expected[k]) for k in expected), work
