"""The `patchdiff` command: dataset -> train -> generate -> fid -> report, plus a CPU demo.

Each sub-command lives in its own module with `add_parser(subparsers)`, which registers its flags and
sets `func`; `func(args)` turns flags into a typed config and calls the library.
"""

from __future__ import annotations

import argparse
import sys

from patchdiff.cli import compare, dataset, demo, fid, generate, report, train

COMMANDS = (dataset, train, generate, fid, report, compare, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchdiff",
        description="Patch Diffusion: train EDM diffusion models on random crops with coordinate channels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"patchdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
