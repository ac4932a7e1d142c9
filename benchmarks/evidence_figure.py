"""FID against training compute across several `patchdiff compare` studies, one line per schedule.

A study scores its runs at a few points of one budget; the budget study of docs/evidence.md needs
runs of several studies on one axis (e.g. a 3x run scored at 1x, 2x, 3x and a separate 10x run). Each
`--series LABEL=DIR[,DIR...]` names configuration folders (`OUT/runs/NAME`, holding `result.json`);
every FID the runs logged is placed at the run's cumulative counted FLOPs (logged with it), and the points of
a series are joined in order of compute.

    python benchmarks/evidence_figure.py --out budget.png --budget 1.4494e13 \\
        --series "whole images=out-study-long/runs/full,out-study-10x/runs/full" \\
        --series "patch=out-study-long/runs/patch,out-study-10x/runs/patch"

`--table FILE.csv` adds series from recorded numbers (columns `label,compute,fid`, compute in units of
the budget), for runs whose folders are gone or that were scored elsewhere; rows of one label form one
series.

Prints every point it plots (label, run folder, kimg, budget multiple, FID, KID).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from patchdiff.files import atomic_write_bytes
from patchdiff.report.plots import png_bytes
from patchdiff.report.series import metric_series, read_stats


def points(config_dir: Path) -> list[tuple[float, float, float, float]]:
    """(kimg, FLOPs, FID, KID) of every scored snapshot of one configuration's run."""
    result_path = config_dir / "result.json"
    if not result_path.is_file():
        raise SystemExit(f"{result_path}: not found; is {config_dir} a finished configuration of a study?")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    # The run folder lies inside the configuration folder; its recorded path is relative to where the
    # study ran, so take only its name.
    stats = read_stats(config_dir / Path(result["run_dir"]).name)
    fid, kid = metric_series(stats, "fid"), metric_series(stats, "kid")
    kids = dict(zip(kid.kimg.tolist(), kid.value.tolist(), strict=True))
    # The run's cumulative counted FLOPs where logged: a progressive run's early kimg are cheap crops,
    # so kimg x its average FLOPs per image would misplace its intermediate points.
    estimate = fid.kimg * 1000 * result["flops_per_image"]
    flops = estimate if fid.flops is None else np.where(np.isfinite(fid.flops), fid.flops, estimate)
    return [
        (k, x, f, kids.get(k, math.nan))
        for k, x, f in zip(fid.kimg.tolist(), flops.tolist(), fid.value.tolist(), strict=True)
    ]


def table_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{label: [(compute in budget units, FID), ...]} from a CSV with columns label, compute, fid."""
    series: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"label", "compute", "fid"} <= set(reader.fieldnames):
            raise SystemExit(f"{path}: needs the columns label, compute, fid (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                point = (float(row["compute"]), float(row["fid"]))
            except (TypeError, ValueError):
                raise SystemExit(f"{path}, line {line}: compute and fid must be numbers, got {row}") from None
            series.setdefault(row["label"], []).append(point)
    return series


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", action="append", default=[], metavar="LABEL=DIR[,DIR...]")
    parser.add_argument("--table", type=Path, help="CSV of recorded points: label, compute, fid")
    parser.add_argument("--budget", type=float, required=True, help="FLOPs of 1x, the x axis unit")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="FID against training compute")
    parser.add_argument("--ylabel", default="FID (1,000 samples)", help="say how many samples the FIDs used")
    args = parser.parse_args(argv)
    if not args.series and not args.table:
        parser.error("give --series, --table or both")

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for i, spec in enumerate(args.series):
        label, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"--series {spec!r}: expected LABEL=DIR[,DIR...]")
        found = []
        for d in dirs.split(","):
            for kimg, flops, fid, kid in points(Path(d)):
                print(
                    f"{label:>14s}  {d:<40s} kimg {kimg:8.2f}  {flops / args.budget:5.2f}x  FID {fid:7.2f}  KID {kid:.4f}"
                )
                found.append((flops / args.budget, fid))
        found.sort()
        ax.plot([x for x, _ in found], [y for _, y in found], "o-", ms=4, color=f"C{i}", label=label)
    tables = table_series(args.table) if args.table else {}
    for i, (label, found) in enumerate(tables.items(), start=len(args.series)):
        for x, fid in found:
            print(f"{label:>14s}  {args.table!s:<40s} {'':14s} {x:5.2f}x  FID {fid:7.2f}")
        found.sort()
        ax.plot([x for x, _ in found], [y for _, y in found], "o-", ms=4, color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="training compute [x budget]", ylabel=args.ylabel, title=args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    atomic_write_bytes(args.out, png_bytes(fig, 100))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
