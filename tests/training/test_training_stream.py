import pytest

from patchdiff.config import PatchConfig
from patchdiff.patching import resolve_schedule
from patchdiff.training.stream import StepPlan, StreamSampler, derive_seed, step_seed


def plan_for(kind: str, duration: float = 10_000, batch: int = 8) -> StepPlan:
    schedule = resolve_schedule(PatchConfig(schedule=kind), (64, 64))
    per_step = tuple(schedule.images_per_round(batch, i) for i in range(len(schedule.sizes)))
    return StepPlan(schedule, 0, per_step, duration)


def test_stochastic_plan_counts_expected_images():
    plan = plan_for("stochastic")
    assert plan.images_per_step == (32, 16, 8)
    assert plan.expected_images == pytest.approx(0.2 * 32 + 0.3 * 16 + 0.5 * 8)
    assert plan.total_steps == -(-10_000 // plan.expected_images)
    assert plan.nimg(10) == pytest.approx(10 * plan.expected_images)


def test_progressive_plan_phases_cover_their_share_of_images():
    plan = plan_for("progressive")
    b = plan.phase_bounds
    assert [plan.size_index(s) for s in (0, b[0] - 1, b[0], b[1] - 1, b[1], b[2] - 1)] == [0, 0, 1, 1, 2, 2]
    assert plan.nimg(b[0]) == pytest.approx(0.2 * 10_000, abs=32)
    assert plan.nimg(b[1]) == pytest.approx(0.5 * 10_000, abs=48)
    assert plan.nimg(plan.total_steps) >= 10_000


def test_full_plan():
    plan = plan_for("full")
    assert plan.images_per_step == (8,) and plan.total_steps == 1250 and plan.size_index(3) == 0


def test_seeds_are_distinct_and_stable():
    assert step_seed(0, 0, 5) == step_seed(0, 0, 5)
    assert len({step_seed(0, r, s) for r in range(4) for s in range(50)}) == 200
    assert derive_seed(1, 2) != derive_seed(2, 1)


def take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_stream_is_sharded_by_rank_and_resumes_exactly():
    plan = plan_for("stochastic")
    whole = take(StreamSampler(50, plan, 8, 1, rank=0, world=1), 12)
    r0 = take(StreamSampler(50, plan, 4, 1, rank=0, world=2), 12)
    r1 = take(StreamSampler(50, plan, 4, 1, rank=1, world=2), 12)
    # Two processes with half the batch each split exactly the one-process stream between them.
    assert [a + b for a, b in zip(r0, r1, strict=True)] == whole
    # An epoch visits every image once.
    flat = [i for batch in whole for i in batch][:50]
    assert sorted(flat) == list(range(50))
    # Resuming at step 5 from the position reached there continues the same stream.
    position = sum(len(b) for b in whole[:5])
    resumed = take(StreamSampler(50, plan, 8, 1, rank=0, world=1, step=5, position=position), 7)
    assert resumed == whole[5:]


def test_batch_sizes_follow_the_crop_size_of_each_step():
    plan = plan_for("stochastic")
    batches = take(StreamSampler(1000, plan, 8, 2, rank=0, world=1), 20)
    for step in range(10):
        expected = plan.schedule.images_per_round(8, plan.size_index(step))
        assert len(batches[2 * step]) == len(batches[2 * step + 1]) == expected
