"""`patchdiff report RUN_DIR`: write report.png and report.html into a training run directory."""

from __future__ import annotations

import argparse

from patchdiff.report import write_report

MAX_DPI = 1000


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="plot a run's loss, metrics, crop-size mix and latest samples",
        description="Read RUN_DIR/stats.jsonl (and config.json, the newest grid-*.png) and write "
        "RUN_DIR/report.png and a self-contained RUN_DIR/report.html. Works on a running or crashed run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `patchdiff train`")
    p.add_argument("--dpi", type=int, default=100, help="resolution of report.png (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.dpi <= MAX_DPI:  # the page is 18x10 inches: 1000 dpi is already 18000x10000 pixels
        raise ValueError(f"--dpi must be in 1..{MAX_DPI}, got {args.dpi}")
    png_path, html_path = write_report(args.run_dir, dpi=args.dpi)
    print(png_path)
    print(html_path)
    return 0
