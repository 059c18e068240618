"""``cascade-clip config show --config NAME [--set key=value ...]``: print the resolved training configuration (JSON)."""

from __future__ import annotations

import argparse

from .train_config import PRESETS, keys, resolve


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="cascade-clip config", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved configuration")
    show.add_argument("--config", default="voc", help=f"preset ({', '.join(PRESETS)}) or a saved config .json")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--data-root")
    show.add_argument("--work-dir")
    show.add_argument("--text-embeddings")
    show.add_argument("--keys", action="store_true", help="list the dotted keys instead")
    args = parser.parse_args(argv)
    cfg = resolve(args.config, args.overrides, data_root=args.data_root, work_dir=args.work_dir,
                  text_embeddings=args.text_embeddings)
    text = "\n".join(keys(cfg)) if args.keys else cfg.to_json()
    print(text)
    return text


if __name__ == "__main__":
    main()
