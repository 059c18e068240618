"""``cascade-clip eval``: zero-shot segmentation metrics of a checkpoint on a dataset split.

Official test protocol (MODEL_SPEC.md section 4): each image's short side is resized to 512 (aspect kept), calibrated
sigmoid scores are averaged over 512x512 windows with stride 426, resized to the original image size, and the argmax
is compared with the original-resolution labels. The confusion matrix is accumulated on the device and summed across
ranks (``torchrun``: each rank takes every world_size-th image, no padding, so no image counts twice).

Classes: evaluating on the dataset the model was trained for uses the model's class list and seen split. Any other
dataset (cross-dataset, e.g. a COCO model on VOC or Context) uses that dataset's catalog classes, all treated as seen
(the official coco2voc / coco2context configs), so mIoU_unseen and hIoU are undefined (null).

Examples::

    cascade-clip eval --checkpoint work_dirs/voc/latest.pt --data-root data
    cascade-clip eval --checkpoint work_dirs/coco/latest.pt --dataset voc --data-root data --text-embeddings voc.npy
    torchrun --nproc_per_node 4 -m cascade_clip.cli eval --checkpoint ... --out metrics.json --save-preds preds/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import distributed
from .catalog import DATASET_NAMES, dataset_info
from .checkpoint import write_text_atomic
from .datasets import build_dataset
from .image_io import save_png_atomic
from .metrics import SegMetrics, compute_metrics, update_confusion
from .train_config import AUTOCAST_DTYPES
from .transforms import eval_resize


def _collate_one(samples):
    return samples


def write_palette_png(path: str, pred: np.ndarray, palette: Sequence[Sequence[int]]) -> None:
    """Class-index map (H, W) -> palette PNG (index i drawn with palette[i]), written atomically."""
    image = Image.fromarray(pred.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb][: 256 * 3]
    image.putpalette(flat + [0] * (768 - len(flat)))
    save_png_atomic(image, path)


def default_palette(num_classes: int, dataset: Optional[str] = None) -> list:
    if dataset in DATASET_NAMES:
        palette = [list(c) for c in dataset_info(dataset).palette]
        if len(palette) >= num_classes:
            return palette[:num_classes]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(num_classes, 3)).tolist()


@torch.no_grad()
def evaluate_model(
    model,
    text: torch.Tensor,
    *,
    dataset: str,
    root: str,
    split: str,
    class_names: Sequence[str],
    seen: Sequence[int],
    calibrate: Sequence[int],
    short_side: int = 512,
    device: Optional[torch.device] = None,
    save_preds: Optional[str] = None,
    palette: Optional[Sequence[Sequence[int]]] = None,
    num_workers: int = 2,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    dist_info: Optional[distributed.DistInfo] = None,
) -> SegMetrics:
    """Metrics of ``model`` (unwrapped CascadeCLIP) with ``text`` (C, D) on ``dataset``/``split`` at ``root``.

    ``seen`` decides the seen/unseen means; ``calibrate`` the text rows whose scores get the seen calibration.
    """
    rank = dist_info.rank if dist_info else 0
    world = dist_info.world_size if dist_info else 1
    device = device or next(model.parameters()).device
    num_classes = len(class_names)
    if text.shape[0] != num_classes:
        raise ValueError(f"{text.shape[0]} text embeddings for {num_classes} classes of {dataset}")
    data = build_dataset(dataset, root, split, num_classes=num_classes)
    shard = torch.utils.data.Subset(data, list(range(rank, len(data), world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=num_workers, collate_fn=_collate_one)
    was_training = model.training
    model.eval()
    text = text.to(device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    if save_preds:
        os.makedirs(save_preds, exist_ok=True)
        palette = palette or default_palette(num_classes, dataset)
    bar = None
    if progress and rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(shard), desc="eval", unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
        except ImportError:
            bar = None
    start = time.perf_counter()
    for (sample,) in loader:
        image = sample["image"].to(device).unsqueeze(0)
        label = sample["label"].to(device)
        inputs = eval_resize(image, short_side)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scores = model.segment(inputs, text, seen=list(calibrate))
        from .inference import scores_at_original_size

        pred = scores_at_original_size(scores.float(), label.shape[-2:]).argmax(dim=1)[0]
        update_confusion(cm, pred, label)
        if save_preds:
            write_palette_png(os.path.join(save_preds, sample["name"] + ".png"), pred.cpu().numpy(), palette)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    distributed.all_reduce_sum(cm)
    if was_training:
        model.train()
    metrics = compute_metrics(cm, class_names, seen)
    metrics.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    metrics.confusion = cm.cpu()  # type: ignore[attr-defined]
    return metrics


def eval_classes(model_cfg, dataset: str):
    """(class names, seen for the means, rows to calibrate) for evaluating a model of ``model_cfg`` on ``dataset``."""
    if dataset == model_cfg.dataset:
        return list(model_cfg.class_names), list(model_cfg.seen), list(model_cfg.seen)
    names = list(dataset_info(dataset).classes)
    everything = list(range(len(names)))
    # Cross-dataset (official coco2voc / coco2context): every class is "seen"; calibrating all rows alike does not
    # change the argmax, so none is calibrated.
    return names, everything, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascade-clip eval", description="Evaluate a checkpoint: mIoU, seen/unseen mIoU, hIoU, aAcc.")
    p.add_argument("--checkpoint", required=True, help="ours (latest.pt, iter_N.pt) or an official .pth")
    p.add_argument("--dataset", choices=DATASET_NAMES, help="layout and classes (default: the model's dataset)")
    p.add_argument("--data-root", default="data", help="folder holding the dataset (or its layout root)")
    p.add_argument("--split", help="split to evaluate (default: the checkpoint's data.val_split when evaluating "
                   "its own dataset, else val)")
    p.add_argument("--text-embeddings", help="(C, D) .npy of the evaluated classes (default: stored in the checkpoint or CLIP's text tower)")
    p.add_argument("--templates", choices=("single", "multi"), help="prompt templates (default: VOC single, others multi)")
    p.add_argument("--short-side", type=int, help="test scale (default: the checkpoint's eval.short_side, so the "
                   "metrics equal those printed at the end of training; official checkpoints 512)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a model config field, e.g. model.stride=256 (repeatable)")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "cpp", "reference"))
    p.add_argument("--precision", default="fp32", choices=tuple(AUTOCAST_DTYPES), help="fp32 (official), or bf16/fp16 autocast, on a GPU and on the CPU alike (as predict --precision)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--save-preds", metavar="DIR", help="write each prediction as a palette PNG of class indices")
    return p


def resolve_text(model, raw_checkpoint: dict, class_names, *, path, templates, dataset, clip_pretrained=None) -> torch.Tensor:
    """Class embeddings for evaluation: ``path`` if given; else those stored in our checkpoint when the classes are
    the ones it was trained on; else, for an official checkpoint, CLIP's text tower with ``clip_pretrained`` if given,
    else the checkpoint's own (``text_encoder.*``), the precedence of ``predict``; else CLIP's text tower
    (``clip_pretrained``) or, without weights, the fixed-seed random tower."""
    from .text_source import load_text

    stored = raw_checkpoint.get("text_embeddings")
    if not path and stored is not None and list(raw_checkpoint.get("class_names", [])) == list(class_names):
        return torch.as_tensor(stored).float()
    templates = templates or ("single" if dataset == "voc" else "multi")
    if not path and "official_state_dict" in raw_checkpoint:
        from .text_weights import embeddings_for, pick_text_weights

        # an official checkpoint without text_encoder.* and no clip_pretrained is a named error here: a random text
        # tower would make the official model's metrics meaningless
        source = pick_text_weights(clip_model=model.cfg.clip_model, clip_weights=clip_pretrained,
                                   checkpoint_path=raw_checkpoint["path"], checkpoint_raw=raw_checkpoint,
                                   quick_gelu=model.cfg.quick_gelu)
        return embeddings_for(class_names, source, templates=templates)
    return load_text(
        class_names,
        embed_dim=model.embed_dim,
        clip_model=model.cfg.clip_model,
        clip_pretrained=clip_pretrained,
        templates=templates,
        path=path,
        quick_gelu=model.cfg.quick_gelu,
    )


def evaluation_settings(raw_checkpoint: dict, dataset: str, *, split=None, short_side=None) -> tuple:
    """``(split, short side)`` of an evaluation: the ones asked for, else those the checkpoint was trained to be
    evaluated with (its ``train_config``; the split only on its own dataset), else the official ``val`` and 512."""
    train_cfg = raw_checkpoint.get("train_config") or {}
    data, evaluation = train_cfg.get("data") or {}, train_cfg.get("eval") or {}
    if split is None:
        split = data.get("val_split", "val") if data.get("dataset") == dataset else "val"
    if short_side is None:
        short_side = int(evaluation.get("short_side", 512))
    if short_side <= 0:
        raise ValueError(f"--short-side must be > 0, got {short_side}")
    return split, short_side


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from . import ops
    from .checkpoint import load_model
    from .train_config import model_override

    ops.set_backend(args.kernels)
    info = distributed.setup()
    try:
        overrides = dict(model_override(assignment) for assignment in args.overrides)
        # The checkpoint holds every weight: do not re-read the CLIP file it was trained from (it may have moved);
        # its name still selects the text tower for embedding class names.
        text_weights = overrides.get("clip_pretrained")
        overrides["clip_pretrained"] = None
        model, raw = load_model(args.checkpoint, map_location=str(info.device), **overrides)
        raw["path"] = args.checkpoint
        if text_weights is None:
            text_weights = (raw.get("model_config") or {}).get("clip_pretrained")
        dataset = args.dataset or model.cfg.dataset
        if dataset not in DATASET_NAMES:
            raise ValueError(f"the model's dataset {dataset!r} has no layout; pass --dataset")
        split, short_side = evaluation_settings(raw, dataset, split=args.split, short_side=args.short_side)
        class_names, seen, calibrate = eval_classes(model.cfg, dataset)
        text = resolve_text(model, raw, class_names, path=args.text_embeddings, templates=args.templates,
                            dataset=dataset, clip_pretrained=text_weights)
        dtype = AUTOCAST_DTYPES[args.precision]  # asked for explicitly: honoured on the CPU too, like predict
        metrics = evaluate_model(
            model, text, dataset=dataset, root=args.data_root, split=split, class_names=class_names, seen=seen,
            calibrate=calibrate, short_side=short_side, device=info.device, save_preds=args.save_preds,
            num_workers=args.num_workers, autocast_dtype=dtype, dist_info=info,
        )
        result = metrics.to_dict()
        if info.is_main:
            print(metrics.table(seen))
            if args.out:
                write_text_atomic(args.out, json.dumps(result, indent=2))
        return result
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
