import numpy as np
import pytest
import torch

from patchdiff.data import ImageDataset
from patchdiff.data.subset import SubsetDataset, subset_indices, training_subset


def test_subset_indices_first_or_seeded():
    assert subset_indices(10, 3).tolist() == [0, 1, 2]
    a, b = subset_indices(100, 20, seed=5), subset_indices(100, 20, seed=5)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 20 and list(a) == sorted(a)
    assert not np.array_equal(a, subset_indices(100, 20, seed=6))
    with pytest.raises(ValueError, match=r"--subset 11: must lie in 1\.\.10"):
        subset_indices(10, 11)


def test_the_view_keeps_the_data_sets_properties_and_mirrors(landscapes):
    dataset = ImageDataset(landscapes, xflip=True)
    view = training_subset(dataset, 5, seed=3)
    assert isinstance(view, SubsetDataset) and len(view) == 10  # 5 images and their mirrors
    assert view.resolution == dataset.resolution and view.num_channels == dataset.num_channels
    first = view.indices[0]
    assert torch.equal(view[0][0], dataset[first][0]) and torch.equal(view[5][0], dataset[first][0].flip(-1))
    assert training_subset(dataset, 0) is dataset


def test_training_uses_the_subset(landscapes, tmp_path):
    from tests.conftest import tiny_config

    from patchdiff.training.setup import prepare

    setup = prepare(tiny_config(str(landscapes), str(tmp_path), subset=7, subset_seed=2), None, 1)
    assert len(setup.dataset) == 7 and setup.dataset.indices == subset_indices(64, 7, 2).tolist()
    with pytest.raises(ValueError, match="--subset 65"):
        prepare(tiny_config(str(landscapes), str(tmp_path), subset=65), None, 1)


def test_a_resumed_run_keeps_its_subset():
    from patchdiff.config import TrainConfig
    from patchdiff.training.setup import merge_resumed

    with pytest.raises(ValueError, match="subset is 20 on the command line but 10 in the resumed run"):
        merge_resumed(TrainConfig(subset=10), TrainConfig(subset=20), {"subset"})
