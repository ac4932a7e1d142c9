import numpy as np
import pytest
import torch
from scipy.stats import chi2
from tests import vae as helpers

from patchdiff.config import PatchConfig
from patchdiff.data import open_dataset
from patchdiff.patching import StepPlan, coordinate_grid, crop_at, crop_coords, resolve_schedule
from patchdiff.training.stream import (
    Crop,
    CropDataset,
    CropKey,
    StreamSampler,
    crop_offsets,
    derive_seed,
    step_seed,
)

tiny_vae, class_images, latent_set = helpers.tiny_vae, helpers.class_images, helpers.latent_set  # fixtures


def plan_for(kind: str, duration: float = 10_000, batch: int = 8, size=(64, 64), seed: int = 0) -> StepPlan:
    schedule = resolve_schedule(PatchConfig(schedule=kind), size)
    return StepPlan(schedule, seed, schedule.images_per_step(batch), duration)


def test_seeds_are_distinct_and_stable():
    assert step_seed(0, 0, 5) == step_seed(0, 0, 5)
    assert len({step_seed(0, r, s) for r in range(4) for s in range(50)}) == 200
    assert derive_seed(1, 2) != derive_seed(2, 1)


def take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def indices(batches):
    return [[key.index for key in batch] for batch in batches]


def test_stream_is_sharded_by_rank_and_resumes_exactly():
    plan = plan_for("stochastic")
    whole = take(StreamSampler(50, plan, 8, 1, rank=0, world=1), 12)
    r0 = take(StreamSampler(50, plan, 4, 1, rank=0, world=2), 12)
    r1 = take(StreamSampler(50, plan, 4, 1, rank=1, world=2), 12)
    # Two processes with half the batch each split exactly the one-process stream between them.
    assert [a + b for a, b in zip(indices(r0), indices(r1), strict=True)] == indices(whole)
    # An epoch visits every image once.
    flat = [i for batch in indices(whole) for i in batch][:50]
    assert sorted(flat) == list(range(50))
    # Resuming at step 5 from the position reached there continues the same stream, crops included.
    position = sum(len(b) for b in whole[:5])
    resumed = take(StreamSampler(50, plan, 8, 1, rank=0, world=1, step=5, position=position), 7)
    assert resumed == whole[5:]


def test_batch_sizes_and_crops_follow_the_crop_size_of_each_step():
    plan = plan_for("stochastic")
    batches = take(StreamSampler(1000, plan, 8, 2, rank=0, world=1), 20)
    for step in range(10):
        index = plan.size_index(step)
        expected = plan.schedule.images_per_round(8, index)
        assert len(batches[2 * step]) == len(batches[2 * step + 1]) == expected
        h, w = plan.schedule.crop_shape(index)
        for key in batches[2 * step] + batches[2 * step + 1]:
            assert (key.height, key.width) == (h, w)
            assert 0 <= key.top <= 64 - h and 0 <= key.left <= 64 - w
            if h == 64:  # a full-size step cuts nothing
                assert key.top == key.left == 0


@pytest.mark.parametrize("full", [(8, 8), (8, 11)])
def test_every_offset_is_reachable_and_uniform(full):
    """Offsets of 3x3 crops over many steps and rounds: each (top, left) in 0..H-3 x 0..W-3, equally likely."""
    H, W = full
    offsets = np.concatenate(
        [crop_offsets(5, 1, step, r, 40, full, (3, 3)) for step in range(100) for r in range(2)]
    )
    counts = np.zeros((H - 2, W - 2))
    np.add.at(counts, (offsets[:, 0], offsets[:, 1]), 1)
    assert counts.sum() == len(offsets) and (counts > 0).all()  # every offset, 0 and H-3 included
    expected = len(offsets) / counts.size
    assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all()
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert chi2.sf(statistic, counts.size - 1) > 1e-4


def test_offsets_depend_only_on_seed_rank_step_round_and_slot():
    args = dict(full=(32, 32), crop=(8, 8))
    base = crop_offsets(0, 0, 7, 1, 16, **args)
    assert np.array_equal(base, crop_offsets(0, 0, 7, 1, 16, **args))
    # Slot i's offset does not depend on how many crops the round has.
    assert np.array_equal(base[:5], crop_offsets(0, 0, 7, 1, 5, **args))
    for other in [(1, 0, 7, 1), (0, 1, 7, 1), (0, 0, 8, 1), (0, 0, 7, 0)]:  # seed, rank, step, round
        assert not np.array_equal(base, crop_offsets(*other, 16, **args))
    assert not crop_offsets(0, 0, 0, 0, 4, (32, 32), (32, 32)).any()  # full size: (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        crop_offsets(0, 0, 0, 0, 4, (32, 32), (33, 8))
    # Two ranks cut the crops of one step at different places.
    plan = plan_for("stochastic")
    r0 = take(StreamSampler(50, plan, 4, 1, rank=0, world=2), 8)
    r1 = take(StreamSampler(50, plan, 4, 1, rank=1, world=2), 8)
    cropped = [i for i in range(8) if r0[i][0].height < 64]
    assert cropped and all(
        [(k.top, k.left) for k in r0[i]] != [(k.top, k.left) for k in r1[i]] for i in cropped
    )


def load_rounds(dataset, plan, workers: int, count: int) -> list[Crop]:
    sampler = StreamSampler(len(dataset), plan, 4, 2, rank=1, world=2)
    loader = torch.utils.data.DataLoader(CropDataset(dataset), batch_sampler=sampler, num_workers=workers)
    rounds = iter(loader)
    out = [next(rounds) for _ in range(count)]
    del rounds
    return out


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_the_loader_cuts_the_crops_of_the_full_images(kind, landscapes, request):
    """Crops cut by the loader workers are the full image's pixels (or the latent's mean and std) at the
    sampler's offsets, whatever the number of workers; their coordinates are the full grid's there."""
    dataset = open_dataset(landscapes if kind == "pixels" else request.getfixturevalue("latent_set"))
    H, W = dataset.resolution
    plan = plan_for("stochastic", size=(H, W), seed=3)
    count = 12
    keys = take(StreamSampler(len(dataset), plan, 4, 2, rank=1, world=2), count)
    serial, parallel = load_rounds(dataset, plan, 0, count), load_rounds(dataset, plan, 2, count)
    grid = coordinate_grid(H, W)
    sizes = set()
    for batch_keys, a, b in zip(keys, serial, parallel, strict=True):
        for field_a, field_b in zip(a, b, strict=True):
            assert torch.equal(field_a, field_b)  # the same crops with 0 and 2 workers
        h, w = batch_keys[0].height, batch_keys[0].width
        sizes.add(h)
        assert a.data.shape[-2:] == (h, w) and a.data.dtype == dataset[0][0].dtype
        assert a.top.tolist() == [k.top for k in batch_keys] and a.left.tolist() == [
            k.left for k in batch_keys
        ]
        full = torch.stack([dataset[k.index][0] for k in batch_keys])
        flat = full.flatten(1, -3)  # latents [B, 2, C, H, W] -> [B, 2C, H, W]: mean and std cut alike
        expected, coords = crop_at(flat, a.top, a.left, (h, w))
        assert torch.equal(a.data, expected.view(a.data.shape))
        assert torch.equal(crop_coords(a.top, a.left, (h, w), (H, W)), coords)
        for n, k in enumerate(batch_keys):
            assert torch.equal(coords[n], grid[:, k.top : k.top + h, k.left : k.left + w])
            assert a.label[n].item() == dataset[k.index][1]
    assert len(sizes) > 1  # several crop sizes, the full one included
    assert max(sizes) == H


def test_a_crop_key_reads_one_window():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    dataset = [(images[0], 7), (images[1], 8)]
    item = CropDataset(dataset)[CropKey(1, 2, 1, 2, 3)]
    assert torch.equal(item.data, images[1, :, 2:4, 1:4]) and (item.label, item.top, item.left) == (8, 2, 1)
    whole = CropDataset(dataset)[CropKey(0, 0, 0, 4, 5)]
    assert whole.data.data_ptr() == images[0].data_ptr()  # a full-size crop is the image itself
