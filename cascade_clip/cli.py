"""The ``cascade-clip`` command. Each subcommand is a module with ``main(argv)``, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Set to 1 to see the traceback of a user error (bad path, value, file) instead of its one-line message.
DEBUG_VARIABLE = "CASCADE_CLIP_DEBUG"

# subcommand -> (module, one-line help)
COMMANDS = {
    "quickstart": ("cascade_clip.quickstart", "make run's job: a tiny model trained and evaluated on a synthetic "
                   "dataset, inductive then transductive (CPU, ~25 s, nothing downloaded)"),
    "demo": ("cascade_clip.demo", "forward, loss and sliding-window inference of a tiny model on synthetic data"),
    "info": ("cascade_clip.info", "versions, the C++ extension and the available ops backends"),
    "train": ("cascade_clip.train", "train a model (official recipe; torchrun for several GPUs)"),
    "eval": ("cascade_clip.evaluate", "evaluate a checkpoint: mIoU (seen/unseen), hIoU, pixel accuracy"),
    "config": ("cascade_clip.config_cli", "show a resolved training configuration"),
    "predict": ("cascade_clip.predict", "segment your own images with any class names"),
    "embed-text": ("cascade_clip.embed_text", "class names -> L2-normalised text embeddings (.npy)"),
    "bench": ("cascade_clip.bench_cli",
              "run a benchmark of the checkout's bench/ (kernels, cpu, train, pipeline, host, steps, segment)"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cascade-clip", description="Cascade-CLIP zero-shot semantic segmentation")
    parser.add_argument(
        "command", choices=list(COMMANDS), help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items())
    )
    args = parser.parse_args(argv[:1])
    module_name = COMMANDS[args.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        parser.error(f"'{args.command}' is not available in this version")
    try:
        code = module.main(argv[1:])
    except (ValueError, OSError) as exc:
        # user errors (paths, values, files) say what is wrong in their message; a traceback only buries it
        if os.environ.get(DEBUG_VARIABLE) == "1":
            raise
        print(f"cascade-clip {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
