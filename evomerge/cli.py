"""The `evomerge` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from evomerge.errors import EvomergeError


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.io import parse_size
    from evomerge.recipe import Recipe

    recipe = Recipe.from_yaml(args.config)
    out = merge_to_disk(
        recipe,
        Path(args.out),
        device=args.device,
        force=args.force,
        allow_pickle=args.allow_pickle,
        shard_bytes=parse_size(args.shard_size),
        progress=not args.quiet,
        recipe_dir=Path(args.config).resolve().parent,
    )
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="materialize a recipe (ours or a mergekit YAML)")
    merge.add_argument("config", help="recipe YAML (mergekit's merge-config format works as is)")
    merge.add_argument("out", help="output folder (a Hugging Face checkpoint)")
    merge.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    merge.add_argument("--force", action="store_true", help="replace an existing output folder")
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load .bin/.pt weights with torch's weights_only loader",
    )
    merge.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(handler=_cmd_merge)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
