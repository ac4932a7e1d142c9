"""Feature extraction: batching, order, and the split over processes (two gloo processes)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from patchdiff.metrics.features import dataset_features, gather_in_order, generated_features


class SumDetector:
    """Stands in for a Detector: per-channel pixel sums, so every image has distinct features."""

    feature_dim = 3
    device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32).sum(dim=(2, 3))


def make_dataset(n: int) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=g), 0) for _ in range(n)]


def expected_features(dataset) -> torch.Tensor:
    return SumDetector()(torch.stack([image for image, _ in dataset]))


def test_dataset_features_keep_order_over_batches_and_num():
    dataset = make_dataset(11)
    torch.testing.assert_close(dataset_features(dataset, SumDetector(), batch=4), expected_features(dataset))
    torch.testing.assert_close(
        dataset_features(dataset, SumDetector(), batch=3, num=5), expected_features(dataset[:5])
    )
    with pytest.raises(ValueError, match="no images"):
        dataset_features([], SumDetector())


def test_generated_features_follow_the_seeds(monkeypatch):
    import patchdiff.generation

    def fake_iter_images(model, seeds, batch_size, **kwargs):
        for i in range(0, len(seeds), batch_size):
            batch = list(seeds[i : i + batch_size])
            yield batch, torch.stack([torch.full((3, 2, 2), s, dtype=torch.uint8) for s in batch])

    monkeypatch.setattr(patchdiff.generation, "iter_images", fake_iter_images)
    features = generated_features(None, SumDetector(), range(10, 17), batch=3)
    torch.testing.assert_close(features, torch.arange(10, 17).float()[:, None].expand(7, 3) * 4)


def _worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        total = 7  # uneven: rank 0 holds 3 items, ranks 1 and 2 hold 2
        local = torch.arange(rank, total, world, dtype=torch.float32)[:, None].repeat(1, 2)
        gathered = gather_in_order(local, total)
        features = dataset_features(make_dataset(8), SumDetector(), batch=2)
        queue.put((rank, gathered.tolist(), features.tolist()))  # plain lists: no shared memory
    finally:
        dist.destroy_process_group()


def test_features_are_gathered_in_the_original_order_on_every_rank(tmp_path):
    world = 3
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), queue), nprocs=world, start_method="spawn"
    )
    results = [queue.get() for _ in range(world)]
    for _, gathered, features in results:
        assert gathered == torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 2).tolist()
        assert features == expected_features(make_dataset(8)).tolist()
    assert sorted(rank for rank, _, _ in results) == [0, 1, 2]
