"""The robustness protocol's corruptions: deterministic, ordered by severity, wired into the data."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from adamerge import MultiTaskDataModule
from adamerge.data.corruptions import CORRUPTIONS, CorruptedDataset, corrupt
from adamerge.suites.synthetic import SuiteSource


def images(n: int = 6, c: int = 3, size: int = 32) -> torch.Tensor:
    """Smooth random scenes (noise at a few scales, upsampled): like photos, unlike a test grid."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(n, c, size, size)
    for cells in (4, 8, 16):
        out += torch.nn.functional.interpolate(torch.rand(n, c, cells, cells, generator=g), size=(size, size),
                                               mode="bilinear", align_corners=False) / 3
    return out.clamp(0, 1)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_deterministic_per_image_and_grows_with_severity(name):
    x = images()
    for c in (3, 1):
        img = x[0, :c]
        a, b = corrupt(img, name, 3, seed=5), corrupt(img, name, 3, seed=5)
        assert torch.equal(a, b) and a.shape == img.shape and a.min() >= 0 and a.max() <= 1
    dist = [float(torch.stack([(corrupt(im, name, s, seed=i) - im).abs().mean() for i, im in enumerate(x)]).mean())
            for s in range(1, 6)]
    assert all(d > 0 for d in dist), dist
    assert dist[0] < dist[2] < dist[4] and dist[4] > dist[0] * 1.2, (name, dist)
    if name != "pixelate":  # adjacent pixelation factors can tie: cells of 1.67 vs 2 pixels align differently
        assert all(b >= a * 0.98 for a, b in zip(dist, dist[1:])), (name, dist)


def test_random_corruptions_differ_between_images_and_bad_input_is_named():
    img = images()[0]
    assert not torch.equal(corrupt(img, "gaussian_noise", 2, seed=0), corrupt(img, "gaussian_noise", 2, seed=1))
    with pytest.raises(ValueError, match="corruption"):
        corrupt(img, "fog", 2)
    with pytest.raises(ValueError, match="severity must be 1-5"):
        corrupt(img, "contrast", 6)


def test_corrupted_dataset_keeps_labels_and_undoes_normalisation():
    x = images(4)
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]

    class Normalised(TensorDataset):
        pass
    ds = Normalised((x - mean) / std, torch.arange(4))
    ds.mean, ds.std = mean, std
    out = CorruptedDataset(ds, "contrast", 5)
    img, label = out[2]
    assert label == 2
    assert torch.allclose(img * std + mean, corrupt(x[2], "contrast", 5, seed=2), atol=1e-5)


def test_corrupted_images_are_computed_once_per_index_within_the_cache(monkeypatch):
    import adamerge.data.corruptions as corruptions
    calls = []
    real = corruptions.corrupt
    monkeypatch.setattr(corruptions, "corrupt", lambda x, *a, **kw: (calls.append(kw.get("seed")), real(x, *a, **kw))[1])
    ds = TensorDataset(images(5), torch.arange(5))
    one_image = ds[0][0].numel() * 4 / 2 ** 20  # MiB of one corrupted float32 image
    cached = corruptions.CorruptedDataset(ds, "gaussian_noise", 3, cache_mb=2 * one_image)
    calls.clear()  # (the constructor checks the name and severity on a blank image)
    first = [cached[i][0] for i in (0, 1, 2, 0, 1, 2)]
    assert calls == [0, 1, 2, 2]  # 0 and 1 kept (the cache holds two images), 2 recomputed
    assert torch.equal(first[0], first[3]) and torch.equal(first[2], first[5])  # the same image either way
    assert torch.equal(first[2], real(ds[2][0], "gaussian_noise", 3, seed=2))
    uncached = corruptions.CorruptedDataset(ds, "gaussian_noise", 3, cache_mb=0)
    calls.clear()
    assert torch.equal(uncached[1][0], first[1]) and torch.equal(uncached[1][0], first[1])
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="cache_mb"):
        corruptions.CorruptedDataset(ds, "gaussian_noise", 3, cache_mb=-1)


def test_data_module_corrupts_adaptation_and_evaluation_separately():
    dm = MultiTaskDataModule(SuiteSource("tiny"), corruption="gaussian_noise", severity=4,
                             eval_corruption=None)
    dm.select_tasks(SuiteSource("tiny").task_names())
    clean = dm.dataset("digits", "test")
    assert not torch.equal(dm.adaptation_dataset("digits")[0][0], clean[0][0])
    assert torch.equal(dm.eval_dataset("digits")[0][0], clean[0][0])
    same = MultiTaskDataModule(SuiteSource("tiny"), corruption="contrast", severity=2)
    assert torch.equal(same.eval_dataset("digits")[3][0], same.adaptation_dataset("digits")[3][0])
    with pytest.raises(ValueError, match="corruption"):
        MultiTaskDataModule(SuiteSource("tiny"), corruption="snow")
