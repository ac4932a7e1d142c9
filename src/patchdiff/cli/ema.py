"""`patchdiff ema RUN --sigma-rel X[,Y...] --dest DIR`: post-hoc EMA snapshots of any length from the
power-function profiles a run stored (training/posthoc_ema.py; EDM2, Karras et al. 2024, Sec. 3.2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from patchdiff.cli.checks import writable_dir
from patchdiff.cli.train import float_list


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ema",
        help="reconstruct post-hoc EMA snapshots of any sigma_rel from a run",
        description="Combine the power-function EMA snapshots a run stored (phema-*.safetensors, written "
        "with --posthoc-ema, the default with --arch edm2) into the EMA of each SIGMA_REL by the "
        "least-squares fit of EDM2 (Karras et al. 2024). Writes DIR/sigma-<X>/snapshot-<step>.safetensors, "
        "which `patchdiff generate --model` and `fid calc --model` take like a run folder.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder written by `patchdiff train`")
    p.add_argument(
        "--sigma-rel",
        type=float_list,
        required=True,
        metavar="X[,Y...]",
        help="EMA lengths relative to the training time, e.g. 0.05,0.1,0.15 (0 < sigma_rel < 0.2997)",
    )
    p.add_argument("--dest", required=True, metavar="DIR", help="output folder")
    p.add_argument("--step", type=int, help="reconstruct at this snapshot's step (default: the newest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from patchdiff.training.posthoc_ema import check_sigma_rels, reconstruct

    check_sigma_rels(args.sigma_rel)
    writable_dir(Path(args.dest), "--dest")
    for path in reconstruct(args.run_dir, args.sigma_rel, args.dest, step=args.step):
        print(path)
    return 0
