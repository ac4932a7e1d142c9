import json

import numpy as np
import pytest
import torch
from PIL import Image
from tests import vae as helpers

from patchdiff.data import ImageDataset, LatentDataset, open_dataset
from patchdiff.data.latents import encode_dataset
from patchdiff.latent import load_vae

tiny_vae, class_images, latent_set = helpers.tiny_vae, helpers.class_images, helpers.latent_set  # fixtures


def test_a_latent_set_holds_the_posterior_of_every_image(latent_set, tiny_vae, class_images):
    data = LatentDataset(latent_set)
    assert len(data) == helpers.NUM_IMAGES and data.resolution == (4, 4) and data.num_channels == 4
    assert data.pixel_size == (32, 32) and data.vae == str(tiny_vae.resolve())
    assert data.num_classes == 2 and data.labels.tolist() == [0] * 6 + [1] * 4
    item, label = data[7]
    assert item.dtype == torch.float16 and item.shape == (2, 4, 4, 4) and label == 1
    vae = load_vae(str(tiny_vae), "cpu")
    image = torch.from_numpy(np.array(Image.open(class_images / "b" / "007.png"))).permute(2, 0, 1)
    mean, std = vae.encode(image[None])
    torch.testing.assert_close(item[0].float(), mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(item[1].float(), std[0], atol=2e-3, rtol=2e-3)
    meta = json.loads((latent_set / "dataset.json").read_text())
    assert meta["scaling_factor"] == pytest.approx(0.18215) and meta["dtype"] == "float16"
    assert [n for _, n in meta["shards"]] == [4, 4, 2]
    # Channel moments of z = mean + std * eps, from the stored mean and std.
    stored = torch.stack([data[i][0].double() for i in range(len(data))])
    m = stored[:, 0].mean(dim=(0, 2, 3))
    var = (stored[:, 0] ** 2 + stored[:, 1] ** 2).mean(dim=(0, 2, 3)) - m**2
    np.testing.assert_allclose(meta["channel_mean"], m.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(meta["channel_std"], var.sqrt().numpy(), rtol=1e-3, atol=1e-4)
    preview = Image.open(latent_set.with_name("set-preview.png"))
    assert preview.size == (8 * 32, 32) and preview.mode == "RGB"


def test_open_dataset_tells_latents_from_images(latent_set, class_images):
    assert isinstance(open_dataset(latent_set), LatentDataset)
    assert isinstance(open_dataset(class_images / "a"), ImageDataset)
    with pytest.raises(ValueError, match="--xflip"):
        open_dataset(latent_set, xflip=True)


def test_an_interrupted_encoding_continues_with_the_shards_it_has(tiny_vae, class_images, tmp_path):
    vae = load_vae(str(tiny_vae), "cpu")
    encode = vae.encode
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(images)

    vae.encode = failing
    dest = tmp_path / "set"
    flags = dict(class_folders=True, shard_size=4, batch=2, progress=False, max_images=9)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(class_images, dest, vae, **flags)
    assert not dest.exists() and (tmp_path / "set.partial" / "shard-00000.json").is_file()
    vae.encode = encode
    summary = encode_dataset(class_images, dest, vae, **flags)
    assert summary.count == 9 and summary.resumed == 4
    # Finished shards of an interrupted run are never mixed with shards made with other flags.
    vae.encode = failing
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(class_images, tmp_path / "other", vae, **flags)
    vae.encode = encode
    with pytest.raises(ValueError, match=r"1 shard\(s\) of an interrupted run with other settings"):
        encode_dataset(class_images, tmp_path / "other", vae, **{**flags, "shard_size": 3})
    again = encode_dataset(class_images, tmp_path / "fresh", vae, **flags)
    a, b = LatentDataset(dest), LatentDataset(tmp_path / "fresh")
    assert len(a) == len(b) == 9 and a.labels.tolist() == b.labels.tolist()
    for i in range(9):
        assert torch.equal(a[i][0], b[i][0])
    assert again.resumed == 0 and not (tmp_path / "set.partial").exists()


def test_bad_destinations_are_refused(tiny_vae, class_images, tmp_path):
    vae = load_vae(str(tiny_vae), "cpu")
    with pytest.raises(ValueError, match="folder"):
        encode_dataset(class_images, tmp_path / "x.zip", vae, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        encode_dataset(class_images, tmp_path / "full", vae, progress=False)


def test_images_of_other_sizes_need_a_resolution(tiny_vae, tmp_path):
    from patchdiff.demo import make_landscapes

    for i, size in enumerate((32, 40)):
        Image.fromarray(make_landscapes(1, size, seed=i)[0]).save(tmp_path / f"{i}.png")
    vae = load_vae(str(tiny_vae), "cpu")
    with pytest.raises(ValueError, match=r"1.png is 40x40 but earlier images are 32x32; pass --resolution"):
        encode_dataset(tmp_path, tmp_path / "out", vae, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_dataset(tmp_path, tmp_path / "out2", vae, resolution=(36, 36), progress=False)
    summary = encode_dataset(tmp_path, tmp_path / "out", vae, resolution=(16, 16), progress=False, preview=0)
    assert summary.pixel_size == (16, 16) and summary.latent_shape == (4, 2, 2)
