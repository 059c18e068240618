"""``make run``: train and evaluate a tiny Cascade-CLIP on a synthetic dataset, on the CPU, with nothing downloaded.

Writes the procedural dataset (:mod:`cascade_clip.synthetic`, VOC layout, 6 classes named by a shade and a hue: 4
seen, 2 unseen) to a work folder, then runs the real pipeline (``cascade_clip.train`` and ``cascade_clip.evaluate``
with the official augmentation, loss, schedule and sliding-window test) on the ``cascade-tiny`` CLIP with random
weights at 64 px. The class embeddings (the ``--text-embeddings`` file) come from :func:`bag_of_words_embeddings`, a
stand-in for CLIP's text encoder in which names that share a word are related, as CLIP's embeddings of "dark green"
and "dark red" are. It evaluates before and after training: seen mIoU must rise, and so does unseen mIoU, without a
single unseen pixel in training, because the unseen classes are new combinations of words the seen ones carry.
A shorter transductive stage follows (the paper's self-training, as the ``-st`` presets run it: from the inductive
checkpoint, pseudo-labels for unseen pixels, no calibration; ``--st-iters 0`` skips it), and the metrics after it.
Unlike the paper's runs it keeps the first stage's batch size (the ``-st`` presets double it) and starts from the
first stage's last checkpoint (the paper's from the one halfway through the inductive schedule).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from .synthetic import SyntheticSpec, write_voc_layout
from .train_config import resolve


EMBED_DIM = 64  # cascade-tiny's embedding width


def word_vector(word: str, seed: int = 0, dim: int = EMBED_DIM):
    """A fixed random unit vector for ``word`` (float64, ``dim`` wide): the same word gives the same vector in every
    class list (seeded from the word's CRC-32, not Python's per-process string hash)."""
    import zlib

    import numpy as np

    vector = np.random.default_rng([seed, zlib.crc32(word.encode("utf-8"))]).standard_normal(dim)
    return vector / np.linalg.norm(vector)


def bag_of_words_embeddings(class_names: Sequence[str], seed: int = 0, dim: int = EMBED_DIM):
    """``(C, dim)`` float32 unit rows: each class name the normalised sum of its words' :func:`word_vector`.

    A stand-in for CLIP's text encoder that keeps what zero-shot transfer needs from it: names that share words get
    related embeddings ("dark green" has cosine ~0.5 with "dark red" and with "light green", ~0 with "light red"),
    while a random-weight text tower gives nearly parallel vectors (cosine 0.7-0.97) for any prompts that share most
    tokens, and one random vector per class relates no class to another."""
    import numpy as np

    rows = []
    for name in class_names:
        words = name.split()
        if not words:
            raise ValueError(f"class name {name!r} has no words")
        row = np.sum([word_vector(w, seed, dim) for w in words], axis=0)
        rows.append(row / np.linalg.norm(row))
    return np.stack(rows).astype(np.float32)


def write_class_embeddings(path: str, class_names: Sequence[str], seed: int = 0, dim: int = EMBED_DIM) -> str:
    """:func:`bag_of_words_embeddings` of ``class_names`` saved as a ``.npy`` file (``--text-embeddings``)."""
    import torch

    from .text import save_embeddings

    save_embeddings(path, torch.from_numpy(bag_of_words_embeddings(class_names, seed, dim)))
    return path


def quickstart_overrides(data_root: str, work_dir: str, iters: int, spec: SyntheticSpec) -> list:
    """The --set overrides that turn the VOC preset into the tiny CPU job (also used by the tests)."""
    names = ",".join(spec.class_names)
    seen = ",".join(str(i) for i in spec.seen)
    return [
        "model.clip_model=cascade-tiny",
        "model.img_size=64",
        "model.num_prompt_tokens=4",
        f"model.class_names={names}",
        f"model.seen={seen}",
        "model.crop_size=64",
        "model.stride=53",  # 426/512 of the crop, as officially
        "data.train_split=train",
        "data.scale=256,64",  # (2048, 512) scaled to the 64 px crop
        "data.num_workers=0",
        f"data.root={data_root}",
        f"data.text_embeddings={os.path.join(data_root, 'class_embeddings.npy')}",
        "eval.short_side=64",
        f"train.work_dir={work_dir}",
        f"train.iters={iters}",
        "train.batch_size=4",
        f"train.checkpoint_interval={iters}",
        "train.log_interval=25",
        "train.eval_at_start=true",
        "optim.lr=1e-3",  # the official 2e-4 is tuned for 20k iterations with CLIP weights; a short run needs more
        "optim.warmup_iters=10",
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="cascade-clip quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=os.path.join("work_dirs", "quickstart"),
                        help="where the dataset and both stages' checkpoints go")
    parser.add_argument("--iters", type=int, default=300, help="iterations of the inductive stage")
    parser.add_argument("--st-iters", type=int, default=150,
                        help="iterations of the transductive (self-training) stage that follows; 0 skips it")
    parser.add_argument("--kernels", default="auto", choices=("auto", "triton", "cpp", "reference"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.st_iters < 0:
        parser.error(f"--st-iters must be >= 0 (0 skips the transductive stage), got {args.st_iters}")

    start = time.perf_counter()
    spec = SyntheticSpec()
    data_root = os.path.join(args.work_dir, "data")
    write_voc_layout(data_root, spec)
    write_class_embeddings(os.path.join(data_root, "class_embeddings.npy"), spec.class_names)
    print(f"synthetic dataset (VOC layout): {data_root}  {spec.train_images} train / {spec.val_images} val images, "
          f"classes {list(spec.class_names)}, seen {[spec.class_names[i] for i in spec.seen]}, "
          f"unseen {[spec.class_names[i] for i in spec.unseen]}")
    shared = [f"train.kernels={args.kernels}", *args.overrides]  # both stages: the second loads the first's weights
    inductive_dir = os.path.join(args.work_dir, "train")
    cfg = resolve("voc", quickstart_overrides(data_root, inductive_dir, args.iters, spec) + shared)

    from .train import run

    result = run(cfg, resume=None)
    before, after = result["metrics_before"], result["metrics"]
    checkpoint = os.path.join(cfg.train.work_dir, "latest.pt")
    result["metrics_transductive"] = None
    if args.st_iters > 0:
        # the paper's second stage, as the -st presets run it: started from the inductive weights (--load-from), every
        # class's text row, the model's own argmax as the label of unseen pixels, no seen-class calibration. These
        # settings come after the user's --set (which reach both stages), so none of them can be undone by accident;
        # the stage's length and folder neither, so its checkpoint cannot land on the first stage's
        st_dir = os.path.join(args.work_dir, "train-st")
        st_overrides = quickstart_overrides(data_root, st_dir, args.st_iters, spec) + shared + [
            "train.transductive=true", "model.seen_calibration=0.0", "train.eval_at_start=false",
            f"train.work_dir={st_dir}", f"train.iters={args.st_iters}", f"train.checkpoint_interval={args.st_iters}",
        ]
        st_cfg = resolve("voc", st_overrides)
        print(f"\n--- transductive stage: {st_cfg.train.iters} iterations of self-training from {checkpoint} ---")
        result["metrics_transductive"] = run(st_cfg, resume=None, load_from=checkpoint)["metrics"]
        checkpoint = os.path.join(st_cfg.train.work_dir, "latest.pt")

    def pct(metrics, key):
        if metrics is None:  # that evaluation was switched off (train.eval_at_start / eval_at_end)
            return "-"
        return "n/a" if metrics[key] is None else f"{metrics[key]:.2f}"  # None: a split without classes with pixels

    print(f"\nseen mIoU before training: {pct(before, 'mIoU_seen')}   after {cfg.train.iters} iterations: "
          f"{pct(after, 'mIoU_seen')}   (mIoU {pct(before, 'mIoU')} -> {pct(after, 'mIoU')}, "
          f"aAcc {pct(before, 'aAcc')} -> {pct(after, 'aAcc')})")
    print(f"unseen mIoU (zero-shot: no unseen pixel is labelled in training) before: {pct(before, 'mIoU_unseen')}   "
          f"after: {pct(after, 'mIoU_unseen')}   (hIoU {pct(before, 'hIoU')} -> {pct(after, 'hIoU')})")
    st = result["metrics_transductive"]
    if args.st_iters > 0:
        print(f"after {st_cfg.train.iters} more iterations of transductive self-training (pseudo-labels for unseen pixels): "
              f"seen mIoU {pct(st, 'mIoU_seen')}   unseen mIoU {pct(st, 'mIoU_unseen')}   hIoU {pct(st, 'hIoU')}")
    print(f"checkpoint: {checkpoint}   total time {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
