"""Detector features for a data set or for a model generating on the fly, split over processes.

Under torchrun each rank takes items rank, rank + world, rank + 2 world, ...; the features are
all-gathered (padded to equal length) and every rank gets all of them in the original order, so the
result does not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from patchdiff import distributed
from patchdiff.metrics.detector import Detector


def gather_in_order(local: torch.Tensor, total: int) -> torch.Tensor:
    """Features [n_r, D] of items r, r + world, ... on each rank r -> all [total, D] on every rank."""
    world = distributed.world_size()
    if world == 1:
        return local[:total]
    per_rank = -(-total // world)  # ceil
    # NCCL gathers device tensors; gloo gathers CPU tensors.
    device = local.device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(per_rank, local.shape[1], dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    # Row l of rank r is item l * world + r: stacking ranks on dim 1 interleaves them back.
    return torch.stack(pieces, dim=1).reshape(per_rank * world, -1)[:total]


def _progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not (progress and distributed.is_main()))


def _collate_images(items: list[tuple[Any, int]]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(image) for image, _ in items])


def dataset_features(
    dataset: Dataset,
    detector: Detector,
    batch: int = 64,
    num: int | None = None,
    progress: bool = False,
    workers: int = 0,
) -> torch.Tensor:
    """Features [N, D] (float32, CPU) of the first `num` items (all if None) of a dataset whose items
    are (uint8 image [C, H, W], label)."""
    total = len(dataset) if num is None else min(num, len(dataset))
    if total < 1:
        raise ValueError(f"no images to score (dataset of {len(dataset)} images, num={num})")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1; got {batch}")
    rank, world = distributed.rank(), distributed.world_size()
    mine = Subset(dataset, range(rank, total, world))
    loader = DataLoader(
        mine, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=_collate_images
    )
    chunks = [torch.zeros(0, detector.feature_dim, device=detector.device)]
    with _progress_bar(total, "features", progress) as bar:
        for images in loader:
            chunks.append(detector(images))
            bar.update(min(len(images) * world, total - bar.n))
    return gather_in_order(torch.cat(chunks), total).cpu()


def generated_features(
    model: Any,
    detector: Detector,
    seeds: Sequence[int],
    batch: int = 64,
    num_steps: int | None = None,
    class_label: int | None = None,
    cfg_scale: float = 1.0,
    progress: bool = False,
    sampler: str | None = None,
    **churn: float,
) -> torch.Tensor:
    """Features [len(seeds), D] (float32, CPU) of images generated from `seeds` (one per image), never
        written to disk. `model` is what `patchdiff.generation.load` returns; sampler/num_steps None: the
    sampling defaults (patchdiff.sampling.resolve_sampler); `churn`: the stochastic
        sampler's S_churn, S_min, S_max, S_noise (generation.iter_images)."""
    from patchdiff.generation import iter_images  # the sampler front end; imported late to keep this light

    total = len(seeds)
    if total < 1:
        raise ValueError("no seeds to generate from; --num must be >= 1")
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(seeds[rank::world])
    chunks = [torch.zeros(0, detector.feature_dim, device=detector.device)]
    with _progress_bar(total, "generate + features", progress) as bar:
        if mine:
            batches: Iterator[tuple[Any, torch.Tensor]] = iter_images(
                model,
                mine,
                batch_size=batch,
                num_steps=num_steps,
                sampler=sampler,
                class_label=class_label,
                cfg_scale=cfg_scale,
                progress=False,
                **churn,
            )
            for _, images in batches:
                chunks.append(detector(images))
                bar.update(min(len(images) * world, total - bar.n))
    local = torch.cat(chunks)
    if len(local) != len(mine):
        raise RuntimeError(f"generate.iter_images gave {len(local)} images for {len(mine)} seeds")
    return gather_in_order(local, total).cpu()
