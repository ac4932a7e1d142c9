"""The `patchdiff` command: dataset -> train -> generate -> fid -> report, plus a CPU demo.

Each sub-command lives in its own module with `add_parser(subparsers)`, which registers its flags and
sets `func`; `func(args)` turns flags into a typed config and calls the library.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from patchdiff.cli import compare, dataset, demo, ema, fid, generate, importer, report, train

COMMANDS = (dataset, train, generate, fid, report, compare, demo, importer, ema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchdiff",
        description="Patch Diffusion: train EDM diffusion models on random crops with coordinate channels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def one_line(error: BaseException) -> str:
    """The error as one line: an OSError as 'path: reason', any message's line breaks folded."""
    if isinstance(error, OSError) and error.strerror:
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        text = f"{' -> '.join(names)}: {error.strerror}" if names else error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Bad input (ValueError, RuntimeError, a missing file) exits 2 and a failing
    environment (a full disk, no permission) exits 1, each with one line on stderr; Ctrl-C exits 130.
    Warnings print as one line too. `--debug`, where a command has it, shows the traceback instead."""
    args = build_parser().parse_args(argv)
    prefix = f"patchdiff {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(
            f"{prefix}: warning: {message}", file=sys.stderr
        )
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted; partial output was removed", file=sys.stderr)
            return 130
        except (ValueError, RuntimeError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
            if getattr(args, "debug", False):
                raise
            print(f"{prefix}: error: {one_line(error)}", file=sys.stderr)
            return 2
        except MemoryError:
            print(f"{prefix}: error: out of memory; use smaller sizes or batches", file=sys.stderr)
            return 1
        except OSError as error:
            if getattr(args, "debug", False):
                raise
            print(f"{prefix}: error: {one_line(error)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
