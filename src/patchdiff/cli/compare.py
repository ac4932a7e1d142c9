"""`patchdiff compare STUDY.json --outdir DIR`: train named configurations at one FLOP budget and
compare their FID/KID (results.md and plots in DIR)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train configurations at one FLOP budget and compare their FID",
        description="Read a study file (see patchdiff/compare/study.py: data, base_flags, configs, "
        "budget_flops or budget_kimg + budget_of, points, metrics), train each configuration for the kimg "
        "that spends the budget as a `patchdiff train` subprocess, and write results.md, "
        "fid-vs-{kimg,time,flops}.png and grids.png into --outdir. Run it again to resume: finished "
        "configurations are not trained again, an interrupted one resumes.",
    )
    p.add_argument("study", metavar="STUDY.json", help="the study file")
    p.add_argument("--outdir", required=True, help="where the runs and the results go")
    p.add_argument("--plan-only", action="store_true", help="print each configuration's kimg and stop")
    p.add_argument(
        "--results-only", action="store_true", help="redraw results.md and plots from finished configurations"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from patchdiff.compare import finished_results, load_study, plan_study, run_study, write_results

    study = load_study(args.study)
    outdir = Path(args.outdir)
    (outdir / "runs").mkdir(parents=True, exist_ok=True)
    plan = plan_study(study, outdir)
    for name, entry in plan.items():
        print(f"{name}: {entry['flops_per_image']:.4g} FLOPs/image -> {entry['kimg']:.3f} kimg")
    if args.plan_only:
        return 0
    if args.results_only:
        results = finished_results(study, outdir)
        if not results:
            raise ValueError(f"no configuration of {args.study} has finished in {outdir} yet")
    else:
        results = run_study(
            study, outdir, progress=not args.no_progress, on_start=lambda n: print(f"training {n}")
        )
    if study.heldout:
        from patchdiff.compare.sigma_loss import ensure_sigma_losses

        results = ensure_sigma_losses(results, study.heldout, study.heldout_num, outdir)
    if study.memorisation:
        from patchdiff.compare.memorisation import memorisation_along_training

        for name, result in results.items():
            records = memorisation_along_training(
                result,
                study.memorisation,
                outdir / "runs" / name,
                outdir / f"nearest-{name}.png",
                study.nn_rows,
                study.nn_k,
            )
            results[name] = dict(result, memorisation=records, nearest_grid=f"nearest-{name}.png")
    if study.sigma_rel:
        from patchdiff.compare.posthoc_ema import ensure_sigma_rel_sweeps

        results = ensure_sigma_rel_sweeps(results, study, outdir)
        for name, result in results.items():
            if "sigma_rel_sweep" in result:
                print(f"{name}: best post-hoc EMA sigma_rel {result['sigma_rel_sweep']['best']:g}")
    budget = next(iter(plan.values()))["budget_flops"]
    paths = write_results(results, outdir, budget)
    print(paths["table"])
    return 0
