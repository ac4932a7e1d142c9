"""`patchdiff train`: flags -> TrainConfig (training/flags.py) -> training.loop.train."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from patchdiff.config_flags import float_list  # noqa: F401 (cli/fid.py and cli/ema.py import it from here)
from patchdiff.training.flags import add_train_flags, config_from_flags, given_fields


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a data set",
        description="Train an EDM denoiser patch-wise (Patch Diffusion). "
        "Run under torchrun for several GPUs or nodes.",
    )
    add_train_flags(p)  # from config_flags.TRAIN_FLAGS: each setting's flag, help and check next to its field
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from patchdiff.training.loop import train
    from patchdiff.training.signals import RunInterruptedError

    given = given_fields(args)
    cfg = config_from_flags(args)
    try:
        run_dir = train(
            cfg,
            resume=args.resume,
            progress=not args.no_progress,
            device=args.device,
            dry_run=args.dry_run,
            grid=args.grid,
            overrides=given,
            compile=args.compile,
            replan=args.replan,
        )
    except RunInterruptedError as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"patchdiff train: {stop}", file=sys.stderr)
        return stop.exit_code
    except OSError as error:  # a missing data set, an unwritable folder, a full disk: one line
        raise RuntimeError(os_error_line(error)) from None
    if run_dir is not None:
        print(f"done: {run_dir}")
    return 0


WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)


def os_error_line(error: OSError) -> str:
    """What failed, in one line: our own messages ("dataset X does not exist") as they are; the
    system's with the file it names, as "cannot write" only when writing is what failed."""
    if error.strerror is None:  # raised with a message of ours: it already says what failed
        return str(error)
    name = f" {error.filename}" if error.filename else ""
    if error.errno in WRITE_ERRORS:
        return f"cannot write{name}: {error.strerror}"
    return f"{name.strip() or 'a file'}: {error.strerror}"
