"""The localize_stitch row (issue 33): the stitch rule by hand, the mask's kept fraction, and a
float64 transcription of the official Localizer / Stitcher (uiuctml/Localize-and-Stitch @109d206
localize_utils.py L78-135, L184-321) on a tiny pool."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import TensorDataset

from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import registry
from adamerge.methods.localize_stitch import initial_mask, localize_stitch, shot_batches, stitch

ROW = "localize_stitch"


def toy_pool(k: int = 2, seed: int = 0, n_per_task: int = 24):
    """Two linear layers (tanh between) in float64, K experts, a 3-class head and a labeled dataset per task."""
    g = torch.Generator().manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5)).double()
    names = [n for n, _ in encoder.named_parameters()]
    tasks = [f"t{i}" for i in range(k)]
    tv = TaskVectors(tasks, names, [0.5 * torch.randn((k, *p.shape), generator=g, dtype=torch.float64)
                                    for p in encoder.parameters()])
    with torch.random.fork_rng():  # the heads' initialisation: the same whatever ran before
        torch.manual_seed(seed)
        heads = {t: nn.Linear(5, 3).double() for t in tasks}
    data = {t: TensorDataset(torch.randn(n_per_task, 4, generator=g, dtype=torch.float64),
                             torch.arange(n_per_task) % 3) for t in tasks}
    return SimpleNamespace(encoder=encoder, task_vectors=tv, heads=heads), data


def base_of(loaded) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in loaded.encoder.named_parameters()}


def tau_of(loaded, k: int) -> dict[str, torch.Tensor]:
    return {n: t[k] for n, t in zip(loaded.task_vectors.names, loaded.task_vectors.tensors)}


def test_row_is_registered_fitted_with_the_official_defaults():
    m = registry.get(ROW)
    assert m.kind == "fitted" and not m.demo and "Localize-and-Stitch" in m.source
    assert m.profile()["models"] == "1" and m.profile()["storage"] == "-"
    assert "64 labeled train images per class" in m.profile()["data"]
    assert dict(m.data) == {"shots": 64, "shots_split": "train"}  # never the evaluated split
    assert m.refusal("export") is None and m.refusal("predict") is None
    # vision/src/main_localize_stitch.py L48, L55-60; vision_datasets/registry.py L35
    assert m.defaults() == {"sparsity": 1e-5, "sigmoid_bias": 5.0, "lr": 1e7, "epochs": 10, "l1_strength": 1.0,
                            "shots": 64, "batch_size": 128, "data_cap": 1024, "dataless": False, "seed": 0}


def test_disjoint_masks_give_base_plus_each_tasks_masked_vector():
    base = {"w": torch.zeros(2, 3, dtype=torch.float64)}
    t1 = {"w": torch.full((2, 3), 1.0, dtype=torch.float64)}
    t2 = {"w": torch.full((2, 3), 10.0, dtype=torch.float64)}
    m1 = {"w": torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)}
    m2 = {"w": torch.tensor([[0, 0, 0], [1, 0, 1]], dtype=torch.bool)}
    out = stitch(base, [t1, t2], [m1, m2])["w"]
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0], [10.0, 0.0, 10.0]], dtype=torch.float64))


def test_overlapping_masks_average():
    base = {"w": torch.full((4,), 0.5, dtype=torch.float64)}
    taus = [{"w": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)},
            {"w": torch.tensor([5.0, 6.0, 7.0, 8.0], dtype=torch.float64)},
            {"w": torch.tensor([9.0, 10.0, 11.0, 12.0], dtype=torch.float64)}]
    masks = [{"w": torch.tensor([1, 1, 1, 0], dtype=torch.bool)},
             {"w": torch.tensor([1, 1, 0, 0], dtype=torch.bool)},
             {"w": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}]
    want = torch.tensor([0.5 + 15 / 3, 0.5 + 8 / 2, 0.5 + 3, 0.5], dtype=torch.float64)
    torch.testing.assert_close(stitch(base, taus, masks)["w"], want)


def test_the_mask_keeps_exactly_the_requested_fraction():
    loaded, data = toy_pool(k=1)
    taus = list(tau_of(loaded, 0).values())
    n = sum(t.numel() for t in taus)  # 4*5 + 5 + 5*5 + 5 = 55
    for sparsity in (0.1, 0.25, 0.5, 0.9):
        logits = initial_mask(taus, sparsity, 5.0)
        kept = sum(int((s > 0).sum()) for s in logits)
        assert kept == int(sparsity * n)
        # the kept entries are the largest magnitudes over all tensors together
        flat = torch.cat([t.abs().reshape(-1) for t in taus])
        kept_vals = torch.cat([t.abs()[s > 0] for t, s in zip(taus, logits)])
        assert kept_vals.min() >= flat.sort(descending=True).values[int(sparsity * n) - 1]
        # the dataless row (one task): exactly those entries move off the base
        out = localize_stitch(loaded, data, sparsity=sparsity, dataless=True)
        base = base_of(loaded)
        assert sum(int((out[k] != base[k]).sum()) for k in out) == int(sparsity * n)


def test_sparsity_one_and_one_task_is_the_expert():
    loaded, data = toy_pool(k=1)
    expert = {k: base_of(loaded)[k] + tau_of(loaded, 0)[k] for k in loaded.task_vectors.names}
    for kw in ({"dataless": True}, {"epochs": 0}):
        out = localize_stitch(loaded, data, sparsity=1.0, **kw)
        for k in expert:
            torch.testing.assert_close(out[k], expert[k], rtol=0, atol=1e-15)


def official(loaded, data, sparsity, sigmoid_bias, lr, epochs, l1_strength, shots, batch_size, seed):
    """A float64 transcription of the official Localizer.train_graft and Stitcher on an nn.Module
    (in-place interpolation of the weights, ``.grad`` after ``loss.backward``, reset to the base)."""
    tv = loaded.task_vectors
    pretrained = copy.deepcopy(loaded.encoder)
    masks, tvs = [], []
    sig = torch.nn.Sigmoid()
    for k, task in enumerate(tv.task_names):
        model = copy.deepcopy(loaded.encoder)
        names = list(tv.names)
        task_vectors = [tau_of(loaded, k)[n] for n in names]
        abs_tv = torch.cat([t.abs().view(-1) for t in task_vectors])
        values, _ = torch.topk(abs_tv, int(sparsity * abs_tv.numel()))
        threshold = values.min()
        mask = [torch.where(t.abs() >= threshold, sigmoid_bias, -sigmoid_bias).double() for t in task_vectors]
        pre = dict(pretrained.named_parameters())
        for epoch in range(epochs):
            with torch.no_grad():  # interpolate_model(round_=False)
                for n, p in model.named_parameters():
                    p += sig(mask[names.index(n)]) * task_vectors[names.index(n)]
            total, nb = None, 0
            for x, y in shot_batches(data[task], task, shots, batch_size, 1024, seed, epoch):
                loss = torch.nn.CrossEntropyLoss()(loaded.heads[task](model(x)), y)
                loss.backward()
                grad = [p.grad.detach().clone() for p in model.parameters()]
                model.zero_grad()
                grad = [g * t for g, t in zip(grad, task_vectors)]
                total = [lr * g for g in grad] if nb == 0 else [a + lr * g for a, g in zip(total, grad)]
                nb += 1
            total = [a / (1.0 * nb) for a in total]
            with torch.no_grad():  # reset_model
                for n, p in model.named_parameters():
                    p += pre[n] - p
            with torch.no_grad():
                for p, g in zip(mask, total):
                    derivative = sig(p) * (1 - sig(p))
                    reg_term = l1_strength * torch.where(p > 0, derivative, -derivative)
                    p -= g * derivative - reg_term
        masks.append([torch.round(sig(p)) for p in mask])
        tvs.append(task_vectors)
    # Stitcher.get_average_masks, interpolate_models
    averaged = []
    for i in range(len(masks)):
        out = [m.clone() for m in masks[i]]
        for j in range(len(masks)):
            if i == j:
                continue
            for q in range(len(masks[i])):
                out[q] = out[q] + torch.logical_and(masks[i][q], masks[j][q])
        averaged.append([torch.where(o == 0, torch.zeros_like(o), 1.0 / o) for o in out])
    merged = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    for mask, task_vectors in zip(averaged, tvs):
        for q, n in enumerate(tv.names):
            merged[n] += mask[q] * task_vectors[q]
    return merged, masks


def test_row_is_the_official_localize_and_stitch_in_float64():
    loaded, data = toy_pool(k=3, n_per_task=30)
    hp = {"sparsity": 0.2, "sigmoid_bias": 1.0, "lr": 300.0, "epochs": 4, "l1_strength": 0.01, "shots": 7,
          "batch_size": 8, "seed": 3}
    want, masks = official(loaded, data, **hp)
    # the toy training moves masks (else this would only test the initialisation) and they overlap
    init = [initial_mask(list(tau_of(loaded, k).values()), 0.2, 1.0) for k in range(3)]
    # (25 of 165 entries move here: a margin, so that a change of the heads' draw cannot stop them all)
    assert sum(int(((s > 0) != m.bool()).sum()) for k in range(3) for s, m in zip(init[k], masks[k])) >= 5
    assert any(bool((m0.bool() & m1.bool()).any()) for m0, m1 in zip(masks[0], masks[1]))
    got = localize_stitch(loaded, data, **hp)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12)


def test_shots_are_per_class_capped_and_labeled():
    _, data = toy_pool(k=1, n_per_task=30)  # 10 images per class
    batches = list(shot_batches(data["t0"], "t0", 4, 5, 1024, 0, 0))
    labels = torch.cat([y for _, y in batches])
    assert [len(y) for _, y in batches] == [5, 5, 2] and torch.bincount(labels).tolist() == [4, 4, 4]
    assert sum(len(y) for _, y in shot_batches(data["t0"], "t0", 4, 5, 7, 0, 0)) == 7
    # the same images every epoch, in another order
    again = torch.cat([y for _, y in shot_batches(data["t0"], "t0", 4, 5, 1024, 0, 1)])
    assert sorted(again.tolist()) == sorted(labels.tolist())


def test_compare_fits_the_row_on_train_shots_not_on_the_evaluated_split():
    """``one_model`` (compare, ``export --method``) hands a fitted row the datasets of its own
    ``data`` settings: the labeled shots come from the train split."""
    from adamerge.compare import one_model

    class Data:
        def __init__(self, **options):
            self.options = options

        def with_options(self, **options):
            return Data(**{**self.options, **options})

        def adaptation_dataset(self, task):
            return (task, dict(self.options))

    class Loaded:
        class task_vectors:
            task_names = ["a", "b"]

    seen = {}
    method = registry.get(ROW)
    fake = dataclasses.replace(method, build=lambda loaded, data, **hp: seen.update(data) or {})
    one_model(fake, Loaded(), Data(adapt_split="test"), {})
    assert seen == {t: (t, {"adapt_split": "test", "shots": 64, "shots_split": "train"}) for t in ("a", "b")}
