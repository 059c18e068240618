"""The ``cascade-clip`` command: ``cascade-clip demo`` and ``cascade-clip info``.

Training, evaluation and prediction subcommands arrive with the pipeline (issues 5 and 6).
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "demo": ("cascade_clip.demo", "forward, loss and sliding-window inference of a tiny model on synthetic data"),
    "info": ("cascade_clip.info", "versions, the C++ extension and the available ops backends"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cascade-clip", description="Cascade-CLIP zero-shot segmentation")
    parser.add_argument("command", choices=sorted(_COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in _COMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(_COMMANDS[args.command][0])
    module.main(argv[1:] + rest)


if __name__ == "__main__":
    main()
