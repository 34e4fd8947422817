"""Few-shot supervised adaptation: ``data.shots`` and the ``cross_entropy`` objective."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.compare import CompareSettings, compare
from adamerge.data.datamodule import few_shot_indices, labels_of
from adamerge.methods import registry
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer


def tiny() -> PreloadedPool:
    return PreloadedPool(SuitePool("tiny").load())


def test_few_shot_indices_take_n_per_class_with_a_fixed_seed():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = few_shot_indices(labels, 4, seed=5)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [4, 3, 4]  # class 1 has only 3
    assert idx == few_shot_indices(labels, 4, seed=5) and idx == sorted(idx)
    assert idx != few_shot_indices(labels, 4, seed=6)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        few_shot_indices(labels, 0, seed=0)


def test_shots_stream_carries_the_labels_of_the_chosen_images():
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, shots=2, shots_split="train")
    dm.select_tasks(SuiteSource("tiny").task_names())
    batch = next(iter(dm.train_dataloader()))
    for task, (images, indices, labels) in batch.items():
        subset = dm.adaptation_dataset(task)
        full = dm.dataset(task, "train")
        n_classes = int(labels_of(full).max()) + 1
        assert len(subset) == 2 * n_classes
        assert torch.bincount(labels_of(subset), minlength=n_classes).tolist() == [2] * n_classes
        for x, i, y in zip(images, indices, labels):
            item = subset[int(i)]
            assert torch.equal(x, item[0]) and int(y) == int(item[1])
    # without shots the stream stays (images, indices): entropy runs are unchanged
    plain = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8)
    plain.select_tasks(SuiteSource("tiny").task_names())
    assert all(len(v) == 2 for v in next(iter(plain.train_dataloader())).values())
    with pytest.raises(ValueError, match="data.shots must be >= 1"):
        MultiTaskDataModule(SuiteSource("tiny"), shots=0)


def test_labels_of_reads_tensor_datasets_without_decoding():
    ds = TensorDataset(torch.zeros(5, 3), torch.tensor([1, 0, 2, 2, 1]))
    assert labels_of(ds).tolist() == [1, 0, 2, 2, 1]
    assert labels_of(torch.utils.data.Subset(ds, [4, 2])).tolist() == [1, 2]


def test_cross_entropy_objective_gradient_matches_finite_differences():
    model = AdaMerging(tiny(), granularity="taskwise", objective="cross_entropy")
    data = SuiteSource("tiny")
    sets = {t: data.dataset(t, "train") for t in model.task_names}
    images = {t: torch.stack([sets[t][i][0] for i in range(12)]) for t in model.task_names}
    labels = {t: torch.stack([sets[t][i][1] for i in range(12)]).long() for t in model.task_names}
    indices = {t: torch.arange(12) for t in model.task_names}

    def loss_at(coeffs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            model.merged.coefficients.copy_(coeffs)
        params = model.merged.merged_parameters()
        losses = model.task_losses(images, indices, params, labels)
        return torch.stack(list(losses.values())).sum()

    c0 = torch.tensor([[0.3, 0.5, 0.4]])
    model.merged.coefficients.grad = None
    loss_at(c0).backward()
    grad = model.merged.coefficients.grad.clone()
    # the loss is the labels' cross-entropy of each head on the merged features
    with torch.no_grad():
        feats = model.features(images, model.merged.merged_parameters())
        expected = sum(F.cross_entropy(model.heads[t](feats[t]), labels[t]) for t in model.task_names)
    assert loss_at(c0).item() == pytest.approx(float(expected), rel=1e-5)
    eps = 1e-2
    numeric = torch.zeros_like(c0)
    for k in range(3):
        d = torch.zeros_like(c0)
        d[0, k] = eps
        numeric[0, k] = (loss_at(c0 + d).item() - loss_at(c0 - d).item()) / (2 * eps)
    assert torch.allclose(grad, numeric, rtol=0.05, atol=1e-4), (grad, numeric)
    with pytest.raises(ValueError, match="set data.shots"):
        model.task_losses(images, indices, model.merged.merged_parameters())


def test_entropy_objective_gradient_matches_finite_differences():
    model = AdaMerging(tiny(), granularity="taskwise")
    data = SuiteSource("tiny")
    images = {t: torch.stack([data.dataset(t, "test")[i][0] for i in range(12)]) for t in model.task_names}
    indices = {t: None for t in model.task_names}

    def loss_at(coeffs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            model.merged.coefficients.copy_(coeffs)
        return sum(model.task_losses(images, indices, model.merged.merged_parameters()).values())

    c0 = torch.tensor([[0.3, 0.5, 0.4]])
    model.merged.coefficients.grad = None
    loss_at(c0).backward()
    grad = model.merged.coefficients.grad.clone()
    eps = 1e-2
    numeric = torch.tensor([[(loss_at(c0 + eps * torch.eye(3)[k:k + 1]).item()
                              - loss_at(c0 - eps * torch.eye(3)[k:k + 1]).item()) / (2 * eps)
                             for k in range(3)]])
    assert torch.allclose(grad, numeric, rtol=0.05, atol=1e-4), (grad, numeric)


def test_fewshot_training_reads_labels_and_lowers_the_cross_entropy(tmp_path):
    seen = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/ce"]))
    hp = registry.get("adamerging_layerwise_fewshot").resolve({"lr": 1e-2})
    model = AdaMerging(tiny(), **hp)
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16, **registry.get("adamerging_layerwise_fewshot").data)
    trainer(tmp_path, 30, [Rec()]).fit(model, dm)
    assert sum(seen[-5:]) / 5 < 0.9 * sum(seen[:5]) / 5, seen
    with pytest.raises(ValueError, match="needs labeled batches"):
        trainer(tmp_path / "b", 1).fit(AdaMerging(tiny(), objective="cross_entropy"),
                                       MultiTaskDataModule(SuiteSource("tiny"), batch_size=4))


def test_compare_gives_the_fewshot_row_its_shots_and_leaves_other_rows_unlabeled(tmp_path):
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8)
    loaded = SuitePool("tiny").load()
    res = compare(loaded, dm, tmp_path, CompareSettings(steps=2, val_split=None),
                  methods=["adamerging_layerwise", "adamerging_layerwise_fewshot"], say=lambda s: None)
    assert res["hparams"]["adamerging_layerwise_fewshot"]["data"] == {"shots": 4, "shots_split": "train"}
    assert "data" not in res["hparams"]["adamerging_layerwise"]
    assert dm.shots is None
