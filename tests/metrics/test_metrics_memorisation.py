import pytest
import torch

from patchdiff.metrics.memorisation import memorised, memorised_share, nearest


def test_nearest_matches_a_brute_force_search_in_any_chunking():
    gen = torch.Generator().manual_seed(0)
    train, samples = torch.randn(37, 3, 4, 4, generator=gen), torch.randn(11, 3, 4, 4, generator=gen)
    full = torch.cdist(samples.reshape(11, -1).double(), train.reshape(37, -1).double())
    want_d, want_i = full.sort(dim=1)
    for chunk in (1, 5, 37, 1000):
        d, i = nearest(samples, train, k=3, chunk=chunk)
        assert torch.equal(i, want_i[:, :3])
        assert torch.allclose(d, want_d[:, :3], atol=1e-9)


def test_copies_are_memorised_and_novel_samples_are_not():
    gen = torch.Generator().manual_seed(1)
    train = torch.rand(50, 1, 8, 8, generator=gen) * 2 - 1
    copies = train[:6] + 0.01 * torch.randn(6, 1, 8, 8, generator=gen)  # near-copies
    novel = torch.rand(14, 1, 8, 8, generator=gen) * 2 - 1
    distances, index = nearest(torch.cat([copies, novel]), train)
    flags = memorised(distances)
    assert flags[:6].all() and not flags[6:].any()
    assert torch.equal(index[:6, 0], torch.arange(6))
    assert memorised_share(torch.cat([copies, novel]), train) == pytest.approx(6 / 20)


def test_the_ratio_test_closed_form():
    # Distances 1 and 3 to the two training points: exactly at the 1/3 boundary (not memorised); 0.9 is.
    train = torch.tensor([[0.0], [4.0]])
    d, _ = nearest(torch.tensor([[1.0], [0.9]]), train)
    assert torch.allclose(d, torch.tensor([[1.0, 3.0], [0.9, 3.1]], dtype=torch.float64))
    assert memorised(d).tolist() == [False, True]


def test_too_few_training_images_is_one_clear_error():
    with pytest.raises(ValueError, match="need >= 2 training images"):
        nearest(torch.zeros(3, 4), torch.zeros(1, 4))
