"""The GPU run of the training pipeline: the VOC config trains from an official-format CLIP file, end to end.

    python bench/pipeline_run.py --out OUT_DIR                      # GPU: ViT-B/16, 512 px crops, 300 iterations
    python bench/pipeline_run.py --tiny --iters 3 --out /tmp/p      # CPU smoke run (cascade-tiny, 64 px)

Nothing can be downloaded on the GPU machines, so the two inputs are made here: a procedural dataset in the VOC
layout at VOC's image sizes (:mod:`cascade_clip.synthetic`, 6 classes: 4 seen, 2 unseen) and a CLIP with random
weights saved as a TorchScript archive, the format of OpenAI's release files (``ViT-B-16.pt``) that the official
configs load. Everything else is the real pipeline: ``cascade_clip.train.run`` with the VOC preset (512 px crops, the
official augmentation, schedule and loss, 4 images per GPU, bf16 autocast on GPU, the ``auto`` ops backend), the data
loader with workers, atomic checkpoints, and the sliding-window evaluation at the end. The throughput (img/s of the
log windows after the first, which holds the warm-up) and the peak GPU memory are appended to
``OUT_DIR/results_pipeline.csv`` (or ``--csv``). The metrics of random weights on procedural images mean nothing and are not kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from cascade_clip.clip_arch import create_clip
from cascade_clip.quickstart import quickstart_overrides, write_class_embeddings
from cascade_clip.synthetic import SyntheticSpec, write_voc_layout
from cascade_clip.train_config import COMPILE_MODES, resolve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import append_rows, git_commit  # noqa: E402

FIELDS = ["date", "git_commit", "device", "torch", "triton", "clip_model", "img_size", "batch_per_gpu", "iters",
          "precision", "kernels", "compile", "img_per_s", "peak_mem_mb", "train_s", "num_workers"]


def write_openai_format_clip(path: str, name: str, image_size: int, seed: int = 0) -> str:
    """A CLIP with random weights, traced and saved as a TorchScript archive like OpenAI's release files."""
    torch.manual_seed(seed)
    model = create_clip(name).eval()
    with torch.no_grad():
        traced = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, image_size, image_size)},
                                        check_trace=False)
    tmp = path + ".tmp"
    traced.save(tmp)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder: the dataset, the weights file, the run")
    parser.add_argument("--csv", default=None, help="CSV to append the row to (default OUT/results_pipeline.csv)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="cascade-tiny at 64 px (a CPU smoke run)")
    parser.add_argument("--kernels", default="auto", choices=("auto", "triton", "cpp", "reference"))
    parser.add_argument("--compile", default="none", choices=COMPILE_MODES)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    if args.tiny:
        spec = SyntheticSpec(train_images=8, val_images=2)
        clip_name, image_size, dim = "cascade-tiny", 64, 64
    else:
        spec = SyntheticSpec(train_images=64, val_images=4, min_side=375, max_side=500)  # VOC's image sizes
        clip_name, image_size, dim = "ViT-B-16", 224, 512
    data_root = os.path.join(args.out, "data")
    write_voc_layout(data_root, spec)
    write_class_embeddings(os.path.join(data_root, "class_embeddings.npy"), spec.class_names, dim=dim)
    weights = write_openai_format_clip(os.path.join(args.out, f"{clip_name}-openai-format.pt"), clip_name, image_size)

    work_dir = os.path.join(args.out, "train")
    if args.tiny:
        overrides = quickstart_overrides(data_root, work_dir, args.iters, spec)
    else:  # the VOC preset's model, crops and schedule; only the data, classes and run length are this run's
        names = ",".join(spec.class_names)
        overrides = [
            f"model.class_names={names}", f"model.seen={','.join(str(i) for i in spec.seen)}",
            "data.train_split=train", f"data.root={data_root}",
            f"data.text_embeddings={os.path.join(data_root, 'class_embeddings.npy')}",
            f"train.work_dir={work_dir}", f"train.iters={args.iters}", "train.batch_size=4",
            f"train.checkpoint_interval={args.iters}", "train.log_interval=25", "train.eval_at_end=true",
        ]
    overrides += [f"model.clip_pretrained={weights}", f"data.num_workers={args.num_workers}",
                  f"train.kernels={args.kernels}", f"train.compile={args.compile}", *args.overrides]
    cfg = resolve("voc", overrides)

    from cascade_clip.train import run
    from cascade_clip.train_config import autocast_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(cfg, resume=None)
    train_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")

    with open(os.path.join(work_dir, "metrics.jsonl"), encoding="utf-8") as f:
        windows = [r["img_s"] for r in map(json.loads, f) if "img_s" in r]
    steady = windows[1:] or windows
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    from cascade_clip.ops.registry import resolve as resolve_backend

    row = dict(
        date=datetime.date.today().isoformat(), git_commit=git_commit(),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        triton=triton_version, clip_model=cfg.model.clip_model, img_size=cfg.model.img_size,
        batch_per_gpu=cfg.train.batch_size, iters=cfg.train.iters,
        precision=cfg.train.precision if autocast_dtype(cfg.train.precision, device) else "fp32",
        kernels=resolve_backend(args.kernels, device).name, compile=cfg.train.compile,
        img_per_s=f"{statistics.median(steady):.1f}", peak_mem_mb=f"{peak:.0f}", train_s=f"{train_s:.1f}",
        num_workers=cfg.data.num_workers,
    )
    path = args.csv or os.path.join(args.out, "results_pipeline.csv")
    try:
        append_rows(path, FIELDS, [row])
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
