"""``cascade-clip predict``: segment your own images into any class names.

Examples::

    # a Cascade-CLIP checkpoint (this project's or an official .pth), arbitrary class names
    cascade-clip predict --checkpoint cascade_voc.pth --classes "cat,dog,sofa,floor,wall" photos/ --out seg/
    # plain CLIP weights, no Cascade-CLIP checkpoint (MaskCLIP recipe)
    cascade-clip predict --training-free --clip-weights openai --classes "cat,dog,sofa,floor,wall" photo.jpg --out seg/

For each image ``NAME.ext`` it writes ``DIR/NAME.png`` (palette PNG of class indices, original size) and
``DIR/NAME_overlay.png`` (image blended with the colour mask, legend of the classes present), and prints class areas.
Unreadable files are reported and skipped; the exit status is 1 when any input was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Tuple

from .config import ModelConfig
from .embed_text import add_text_arguments

OFFICIAL_CROP, OFFICIAL_STRIDE = ModelConfig.crop_size, ModelConfig.stride  # the official sliding windows

SUMMARY_CLASSES = 6  # classes listed per image on the console (all of them go to --json)


def _override(text: str) -> Tuple[str, object]:
    """``FIELD=VALUE`` -> (ModelConfig field, typed value), as ``eval --set`` (``model.FIELD`` works too)."""
    from .train_config import model_override

    try:
        return model_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade-clip predict", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--classes", required=True, help="preset (voc, context, coco), a text file, or 'cat,dog,grass'")
    parser.add_argument("--out", required=True, help="output folder")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="Cascade-CLIP checkpoint: this project's or an official .pth")
    model.add_argument("--training-free", action="store_true", help="dense CLIP (MaskCLIP recipe) from --clip-weights")
    parser.add_argument("--text-embeddings", help="precomputed (C, D) .npy, rows in --classes order (see embed-text)")
    add_text_arguments(parser)

    group = parser.add_argument_group("inference")
    group.add_argument("--short-side", type=int, default=512, help="test-time short side (official 512; 0 = keep)")
    group.add_argument("--crop-size", type=_positive("--crop-size"),
                       help="sliding-window crop (default: the checkpoint's, 512)")
    group.add_argument("--stride", type=_positive("--stride"), help="sliding-window stride (default: the checkpoint's, "
                       "426; with --crop-size: 426/512 of it)")
    group.add_argument("--seen", help="comma-separated class names to calibrate (default: the checkpoint's seen ones)")
    group.add_argument("--no-calibration", action="store_true", help="no seen-class calibration")
    group.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="FIELD=VALUE",
                       help="override a model config field of the checkpoint (e.g. --set clip_model=ViT-B-16)")
    group.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture for --training-free")
    group.add_argument("--temperature", type=float, help="training-free: cosine / T (default CLIP's 1/logit_scale)")
    group.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),  # train_config.AUTOCAST_DTYPES
                       help="autocast dtype of the model (fp32 = official; bf16/fp16 are faster on a GPU)")
    group.add_argument("--backend", help="ops backend: reference, triton, cpp (default: automatic)")

    output = parser.add_argument_group("output")
    output.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    output.add_argument("--json", help="write per-image class areas and output paths to this JSON file")
    output.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
    return parser


# Formats PIL lists by extension but cannot read as pictures: save-only (PDF, Palm) and data-file stubs that need a
# handler installed by the user (HDF5, GRIB, BUFR). MPO (multi-picture JPEG) is opened by the JPEG reader.
_NOT_PICTURES = {"PDF", "PALM", "HDF5", "GRIB", "BUFR"}


def image_extensions() -> set:
    """File extensions of the image formats PIL reads (a .pdf in a photo folder is not an input)."""
    from PIL import Image

    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items()
            if (fmt in Image.OPEN or fmt == "MPO") and fmt not in _NOT_PICTURES}


def collect_inputs(inputs: List[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files to segment (folders expanded to their image files, sorted, not recursive) and (path, reason) skipped."""
    extensions = image_extensions()
    files, skipped = [], []
    for path in inputs:
        if os.path.isdir(path):
            entries = sorted(os.listdir(path))
            found = [os.path.join(path, e) for e in entries
                     if not e.startswith(".") and os.path.splitext(e)[1].lower() in extensions
                     and os.path.isfile(os.path.join(path, e))]
            if not found:
                skipped.append((path, "folder holds no image files"))
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            skipped.append((path, "no such file or folder"))
    return files, skipped


OVERLAY_SUFFIX = "_overlay"


def output_stems(files: List[str]) -> List[str]:
    """Output name per input: its file stem, numbered when it would share an output file with an earlier input (a/x.jpg,
    b/x.png -> x, x_2; y.png, y_overlay.png -> y, y_overlay_2: y's overlay is y_overlay.png). Compared without case,
    as file systems on macOS and Windows do."""
    taken, stems = set(), []
    for path in files:
        base = os.path.splitext(os.path.basename(path))[0]
        stem, number = base, 1
        while {stem.casefold(), (stem + OVERLAY_SUFFIX).casefold()} & taken:
            number += 1
            stem = f"{base}_{number}"
        taken |= {stem.casefold(), (stem + OVERLAY_SUFFIX).casefold()}
        stems.append(stem)
    return stems


def check_outputs(out_dir: str, inputs: List[str], files: List[str], json_path=None) -> None:
    """Refuse an output folder that is an input folder, or outputs that would overwrite an input image: the originals
    would be lost, and the next run would segment its own outputs."""
    # files are compared by identity (device, inode), not by name: a case-insensitive file system (macOS, Windows)
    # or a link gives one file several names
    def identity(path):
        try:
            st = os.stat(path)
        except OSError:  # not there (yet): it cannot be an input
            return None
        return st.st_dev, st.st_ino

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    out = identity(out_dir)
    for path in inputs:
        if out is not None and os.path.isdir(path) and identity(path) == out:
            raise ValueError(f"--out {out_dir} is the input folder {path}: its outputs would overwrite images there "
                             "or be read as inputs next time; choose another folder")
    originals = {identity(f): f for f in files}
    originals.pop(None, None)
    for stem in output_stems(files):
        for name in (stem + ".png", stem + OVERLAY_SUFFIX + ".png"):
            target = identity(os.path.join(out_dir, name))
            if target in originals:
                raise ValueError(f"--out {out_dir}: {name} would overwrite the input image {originals[target]}; "
                                 "choose another folder")
    if json_path is not None:
        if os.path.isdir(json_path):
            raise ValueError(f"--json {json_path} is a folder; give a file name")
        if identity(json_path) in originals:
            raise ValueError(f"--json {json_path} is an input image")


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0, got {value}")
        return value

    return parse


def check_device(device) -> None:
    """A device the user named must exist here: a one-line error, not a traceback from deep inside torch."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu, or omit --device)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def build_segmenter(args: argparse.Namespace):
    from .class_list import parse_classes
    from .segmenter import Segmenter

    classes = parse_classes(args.classes)
    cache_dir = None if args.no_cache else args.cache_dir
    if args.seen is not None and args.no_calibration:
        raise ValueError("--seen chooses the classes to calibrate and --no-calibration turns calibration off: pass one")
    # a --crop-size without --stride keeps the official overlap (stride 426 of crop 512)
    stride = args.stride or (max(1, args.crop_size * OFFICIAL_STRIDE // OFFICIAL_CROP) if args.crop_size else None)
    if args.training_free:
        return Segmenter.training_free(
            args.clip_weights, classes, clip_model=args.clip_model, text_embeddings=args.text_embeddings,
            templates=args.templates or "multi", temperature=args.temperature, short_side=args.short_side,
            crop_size=args.crop_size or OFFICIAL_CROP, stride=stride or OFFICIAL_STRIDE, device=args.device,
            cache_dir=cache_dir, precision=args.precision, quick_gelu=not args.no_quick_gelu,
        )
    overrides = dict(args.overrides)
    if args.crop_size:
        overrides["crop_size"] = args.crop_size
    if args.stride or (stride and "stride" not in overrides):  # --stride, else --set stride=, else the default
        overrides["stride"] = stride
    if args.no_quick_gelu:
        overrides["quick_gelu"] = False
    seen = None if args.seen is None else [s for s in args.seen.split(",") if s.strip()]
    return Segmenter.from_checkpoint(
        args.checkpoint, classes, text_embeddings=args.text_embeddings, clip_weights=args.clip_weights,
        templates=args.templates, seen=seen, calibration=not args.no_calibration, short_side=args.short_side,
        device=args.device, cache_dir=cache_dir, precision=args.precision, **overrides,
    )


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backend:
        from . import ops

        ops.set_backend(args.backend)
    if args.training_free:
        ignored = [flag for flag, used in (("--set", args.overrides), ("--seen", args.seen is not None),
                                           ("--no-calibration", args.no_calibration)) if used]
        if ignored:
            parser.error(f"{', '.join(ignored)}: only for --checkpoint models, not --training-free")
    if args.short_side < 0:
        parser.error(f"--short-side must be >= 0 (0 keeps the original size), got {args.short_side}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    files, skipped = collect_inputs(args.inputs)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not files:
        parser.exit(2, f"{parser.prog}: error: no images to segment in {args.inputs}\n")
    try:
        check_outputs(args.out, args.inputs, files, args.json)
        check_device(args.device)
        segmenter = build_segmenter(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"model: {segmenter.description}; device {segmenter.device}", file=sys.stderr)
    failed = run_batch(segmenter, files, args, already_skipped=skipped)
    if skipped or failed:
        print(f"done: {len(files) - len(failed)} segmented, {len(skipped) + len(failed)} skipped", file=sys.stderr)
        sys.exit(1)


def run_batch(segmenter, files: List[str], args: argparse.Namespace,
              already_skipped: List[Tuple[str, str]] = ()) -> List[Tuple[str, str]]:
    """Segment ``files`` and write their outputs; returns (path, reason) for the files that failed.

    ``already_skipped`` (inputs that were never files) are only listed in the JSON report.
    """
    from .checkpoint import write_text_atomic
    from .image_io import read_rgb, save_png_atomic
    from .progress import Progress
    from .visualize import class_palette, format_fraction, label_image, overlay_image

    os.makedirs(args.out, exist_ok=True)
    names = segmenter.class_names
    palette = class_palette(names)
    records, failed = [], []
    stems = output_stems(files)
    progress = Progress(files, total=len(files), desc="predict", enabled=not args.no_progress)
    start = time.perf_counter()
    for index, path in enumerate(progress):
        stem = stems[index]
        label_path = os.path.join(args.out, f"{stem}.png")
        overlay_path = os.path.join(args.out, f"{stem}{OVERLAY_SUFFIX}.png")
        written = []
        try:
            rgb = read_rgb(path, upright=True)  # as image viewers show it; the outputs then match that view
            result = segmenter.segment_rgb(rgb, return_scores=False)
            labels = result.labels.numpy()
            counts = result.pixel_counts()
            fractions = {i: c / labels.size for i, c in counts.items()}
            save_png_atomic(label_image(labels, palette), label_path)
            written.append(label_path)
            save_png_atomic(overlay_image(rgb, labels, names, palette, alpha=args.alpha, areas=fractions), overlay_path)
        except (ValueError, RuntimeError, OSError) as exc:  # one bad file (or failed write) must not stop the batch
            for done in written:  # an image's outputs come as a pair or not at all
                os.unlink(done)
            message = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
            progress.write(f"skipped {message}")
            failed.append((path, str(exc)))
            continue
        ordered = sorted(counts, key=lambda i: -counts[i])
        shown = ", ".join(f"{names[i]} {format_fraction(fractions[i])}" for i in ordered[:SUMMARY_CLASSES])
        more = f", +{len(ordered) - SUMMARY_CLASSES} more" if len(ordered) > SUMMARY_CLASSES else ""
        progress.write(f"{path} ({labels.shape[1]}x{labels.shape[0]}): {shown}{more}")
        records.append({
            "image": path, "labels": label_path, "overlay": overlay_path,
            "width": int(labels.shape[1]), "height": int(labels.shape[0]),
            "areas": {names[i]: fractions[i] for i in ordered},
            "pixels": {names[i]: int(counts[i]) for i in ordered},
        })
    elapsed = time.perf_counter() - start
    print(f"{len(records)} image(s) in {elapsed:.1f} s -> {args.out}", file=sys.stderr)
    if args.json:
        payload = {"model": segmenter.description, "classes": list(names), "images": records,
                   "skipped": [{"image": p, "error": e} for p, e in [*already_skipped, *failed]]}
        write_text_atomic(args.json, json.dumps(payload, indent=2))
    return failed


if __name__ == "__main__":
    main()
