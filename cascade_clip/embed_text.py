"""``cascade-clip embed-text``: class names -> a ``.npy`` of L2-normalised (C, D) CLIP text embeddings.

Examples::

    cascade-clip embed-text --classes voc --clip-weights openai --out voc_single.npy
    cascade-clip embed-text --classes "cat,dog,grass" --templates multi --clip-weights ViT-B-16.pt --out pets.npy
    cascade-clip embed-text --classes names.txt --checkpoint cascade_voc.pth --out mine.npy   # official text_encoder.*
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .class_list import official_templates, parse_classes
from .text import DEFAULT_CACHE_DIR, resolve_templates, save_embeddings


def template_arg(value: str):
    """``single``, ``multi``, or a file of templates (one per line, each containing ``{}``)."""
    if value in ("single", "multi"):
        return value
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"templates must be 'single', 'multi' or a file of templates: {value!r}")
    with open(value, encoding="utf-8") as f:
        templates = [line.rstrip("\n") for line in f if line.strip()]
    try:
        return resolve_templates(templates)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value}: {exc}") from exc


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``predict``: where the text weights come from, templates, cache."""
    group = parser.add_argument_group("text embeddings")
    group.add_argument("--clip-weights", help="CLIP weights, open_clip tag (e.g. openai) or local file: the text tower "
                       "(predict --training-free: the image tower too)")
    group.add_argument(
        "--templates", type=template_arg, default=None,
        help="single ('a photo of a {}'), multi (the 15 official templates) or a file of templates; "
        "default: the official set of the class preset / checkpoint dataset (VOC single, Context/COCO multi); "
        "multi for predict --training-free",
    )
    group.add_argument("--no-quick-gelu", action="store_true",
                       help="the CLIP weights were trained with GELU (most non-OpenAI open_clip weights), not OpenAI's "
                       "QuickGELU (default: a checkpoint's config, else QuickGELU); predict --checkpoint: the model's "
                       "quick_gelu=false")
    group.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"embedding cache (default {DEFAULT_CACHE_DIR})")
    group.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="cascade-clip embed-text", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--classes", required=True, help="preset (voc, context, coco), a text file, or 'cat,dog,grass'")
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--clip-model", default=None, help="open_clip architecture (default: checkpoint's or ViT-B-16)")
    parser.add_argument("--checkpoint", help="Cascade-CLIP checkpoint: official (its text_encoder.*) or this project's")
    parser.add_argument("--device", default="cpu")
    add_text_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def run(args: argparse.Namespace) -> None:
    from .text_weights import embeddings_for, pick_text_weights

    classes = parse_classes(args.classes)
    raw, cfg, dataset = None, None, None
    if args.checkpoint:
        from .checkpoint import official_dataset, read_any_checkpoint

        from .config import ModelConfig

        raw = read_any_checkpoint(args.checkpoint)
        if "model_config" in raw:
            cfg = ModelConfig.from_dict(raw["model_config"])
            dataset = cfg.dataset
        elif args.templates is None and classes.preset is None:
            # official: the dataset it was trained on picks the templates (as predict does), when it can be told
            try:
                dataset = official_dataset(raw["official_state_dict"])
            except ValueError:
                dataset = None
    clip_model = args.clip_model or (cfg.clip_model if cfg is not None else "ViT-B-16")
    source = pick_text_weights(
        clip_model=clip_model, clip_weights=args.clip_weights, checkpoint_path=args.checkpoint,
        checkpoint_raw=raw, checkpoint_config=cfg, quick_gelu=False if args.no_quick_gelu else None,
    )
    templates = args.templates or official_templates(classes.preset or dataset)
    start = time.perf_counter()
    embeddings = embeddings_for(
        classes.names, source, templates=templates, cache_dir=None if args.no_cache else args.cache_dir,
        device=args.device,
    )
    save_embeddings(args.out, embeddings)
    template_text = templates if isinstance(templates, str) else f"{len(templates)} templates from file"
    print(
        f"{args.out}: {embeddings.shape[0]} x {embeddings.shape[1]} embeddings ({template_text} templates; "
        f"{source.describe()}; {time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
