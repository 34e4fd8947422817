"""The fitted rows of issue 33 (Fisher merging, RegMean) against hand computations and float64
transcriptions of FusionBench's rules (tanganke/fusion_bench @54c9e8c)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import registry
from adamerge.methods.fisher import adaptation_batches, fisher, fisher_average, fisher_diagonal
from adamerge.methods.regmean import (block_inputs, linear_modules, regmean, regmean_plusplus, regmean_solve,
                                      scale_off_diagonal)
from adamerge.models.layout import Layout
from adamerge.suites.synthetic import TinyViT

NEW_MODULES = {"adamerge.methods.fisher", "adamerge.methods.regmean"}
N_ROWS = 3  # fisher, regmean, regmean_plusplus


def test_the_rows_are_registered_fitted_with_their_profile():
    rows = [n for n in registry.names() if registry.get(n).build.__module__ in NEW_MODULES]
    assert len(rows) == N_ROWS
    for name in rows:
        m = registry.get(name)
        assert m.kind == "fitted" and not m.demo and "fusion_bench" in m.source
        assert m.profile() == {"models": "1", "storage": "-",
                               "data": "256 unlabeled adaptation images per task (adapt split, test by default)"}
        assert m.refusal("export") is None and m.refusal("predict") is None
    # FusionBench's CLIP configs: 256 images in batches of 32; Fisher normalised, eps 1e-6; RegMean 0.95
    assert registry.get("fisher").defaults() == {"num_examples": 256, "batch_size": 32, "normalize": True,
                                                 "eps": 1e-6, "seed": 0}
    for name in rows[1:]:
        assert registry.get(name).defaults() == {"num_examples": 256, "batch_size": 32, "alpha": 0.95, "seed": 0}


def toy_pool(k: int = 2, hidden: int = 5, depth: int = 2, seed: int = 0):
    """An encoder of ``depth`` linear layers (tanh between) in float64, K experts, a head per task,
    and a dataset per task; as a namespace with what the fitted rows read of a LoadedPool."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(4 if i == 0 else hidden, hidden) for i in range(depth)]
    encoder = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1]).double()
    names = [n for n, _ in encoder.named_parameters()]
    tasks = [f"t{i}" for i in range(k)]
    tv = TaskVectors(tasks, names, [0.5 * torch.randn((k, *p.shape), generator=g, dtype=torch.float64)
                                    for p in encoder.parameters()])
    heads = {t: nn.Linear(hidden, 3).double() for t in tasks}
    data = {t: TensorDataset(torch.randn(40, 4, generator=g, dtype=torch.float64), torch.zeros(40, dtype=torch.long))
            for t in tasks}
    layout = Layout(blocks=tuple(str(2 * i) for i in range(depth)))  # each linear layer a block
    return SimpleNamespace(encoder=encoder, task_vectors=tv, heads=heads, layout=layout), data


def expert(loaded, k: int) -> dict[str, torch.Tensor]:
    base = dict(loaded.encoder.named_parameters())
    return {n: base[n].detach() + t[k] for n, t in zip(loaded.task_vectors.names, loaded.task_vectors.tensors)}


# -------------------------------------------------------------------------------- Fisher merging


def test_equal_fishers_give_the_plain_average():
    g = torch.Generator().manual_seed(0)
    thetas = [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g,
                                                                                          dtype=torch.float64)}
              for _ in range(3)]
    f = {"w": torch.rand(3, 2, generator=g, dtype=torch.float64), "b": torch.rand(3, generator=g, dtype=torch.float64)}
    for normalize in (True, False):
        out = fisher_average(thetas, [f, f, f], normalize=normalize)
        for n in f:
            torch.testing.assert_close(out[n], sum(t[n] for t in thetas) / 3, rtol=1e-12, atol=1e-12)


def test_fisher_average_by_hand_with_two_experts():
    """F_1 = (1, 0), F_2 = (0, 2), eps 0. Without normalisation each entry takes the expert with
    Fisher; with eps 1 entry 0 is (2 * 1 + 1 * 3) / (2 + 1) and entry 1 (1 * 1 + 3 * 3) / (1 + 3).
    Normalised, eps 1: coefficients 1 / (|F| + 1) = 1/2, 1/3."""
    t1, t2 = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}, {"w": torch.tensor([3.0, 3.0], dtype=torch.float64)}
    f1, f2 = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}, {"w": torch.tensor([0.0, 2.0], dtype=torch.float64)}
    torch.testing.assert_close(fisher_average([t1, t2], [f1, f2], normalize=False, eps=0.0)["w"],
                               torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(fisher_average([t1, t2], [f1, f2], normalize=False, eps=1.0)["w"],
                               torch.tensor([5 / 3, 10 / 4], dtype=torch.float64))
    # normalised: c = (1/2, 1/3) (the common 1/K and 1/sum cancel); weights c * (F + 1)
    w1, w2 = torch.tensor([2.0, 1.0]) / 2, torch.tensor([1.0, 3.0]) / 3
    want = (w1 * 1 + w2 * 3) / (w1 + w2)
    torch.testing.assert_close(fisher_average([t1, t2], [f1, f2], normalize=True, eps=1.0)["w"], want.double())


def test_fisher_diagonal_is_fusionbench_on_the_module():
    """A float64 transcription of clip_fisher_merging.py L138-183 on an ``nn.Module`` (zero_grad,
    backward, ``.grad ** 2`` per batch, summed, divided by the images seen)."""
    loaded, data = toy_pool(k=1)
    head = loaded.heads["t0"]
    theta = expert(loaded, 0)
    batches = list(adaptation_batches(data["t0"], 25, 10))
    assert [len(b) for b in batches] == [10, 10, 5]
    got = fisher_diagonal(loaded.encoder, head, theta, iter(batches))
    model = nn.Sequential(loaded.encoder, head)
    model[0].load_state_dict(theta, strict=False)
    want = {n: torch.zeros_like(p) for n, p in model[0].named_parameters()}
    for x in batches:
        logits = model(x)
        p = torch.softmax(logits, -1).detach()
        model.zero_grad()
        (p.sqrt() * torch.log_softmax(logits, -1)).sum(-1).sum(0).backward()
        for n, prm in model[0].named_parameters():
            want[n] += prm.grad ** 2
    for n in want:
        torch.testing.assert_close(got[n], want[n] / 25, rtol=1e-10, atol=1e-14)


def test_fisher_row_is_the_fisher_weighted_average_of_the_experts():
    loaded, data = toy_pool(k=3)
    out = fisher(loaded, data, num_examples=32, batch_size=8)
    fishers = [fisher_diagonal(loaded.encoder, loaded.heads[t], expert(loaded, k),
                               adaptation_batches(data[t], 32, 8)) for k, t in enumerate(loaded.task_vectors.task_names)]
    want = fisher_average([expert(loaded, k) for k in range(3)], fishers)
    assert out.keys() == set(loaded.task_vectors.names)
    for n in want:
        torch.testing.assert_close(out[n], want[n], rtol=1e-10, atol=1e-12)
    # not the plain average: the Fishers differ
    mean = {n: sum(expert(loaded, k)[n] for k in range(3)) / 3 for n in want}
    assert any(not torch.allclose(out[n], mean[n], atol=1e-6) for n in want)
    with pytest.raises(ValueError, match="fisher: no adaptation data for tasks"):
        fisher(loaded, {"t0": data["t0"]})


# ------------------------------------------------------------------------------------ RegMean


def test_off_diagonal_scaling():
    g = torch.arange(9.0).reshape(3, 3)
    torch.testing.assert_close(scale_off_diagonal(g, 0.5), torch.tensor([[0.0, 0.5, 1.0], [1.5, 4.0, 2.5],
                                                                           [3.0, 3.5, 8.0]]))


def test_identical_grams_give_the_plain_average():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    gram = x.T @ x / 20
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    for alpha in (0.0, 0.95, 1.0):
        torch.testing.assert_close(regmean_solve([gram] * 3, ws, alpha), sum(ws) / 3, rtol=1e-10, atol=1e-12)


def test_regmean_row_one_task_alpha_zero_returns_the_expert():
    loaded, data = toy_pool(k=1)
    out = regmean(loaded, data, num_examples=16, batch_size=8, alpha=0.0)
    for n, want in expert(loaded, 0).items():
        torch.testing.assert_close(out[n], want, rtol=1e-12, atol=1e-12)


def test_regmean_row_same_inputs_give_the_average_on_the_first_layer():
    """Every task on the same images: the first layer's inputs (the images) and so its Grams are
    the same for every expert, and its merge is the plain average; deeper layers see different
    inputs and are not."""
    loaded, data = toy_pool(k=3)
    same = {t: data["t0"] for t in data}
    out = regmean(loaded, same, num_examples=40, batch_size=16)
    mean = {n: sum(expert(loaded, k)[n] for k in range(3)) / 3 for n in loaded.task_vectors.names}
    torch.testing.assert_close(out["0.weight"], mean["0.weight"], rtol=1e-10, atol=1e-12)
    for bias in ("0.bias", "2.bias"):  # biases are averaged
        torch.testing.assert_close(out[bias], mean[bias], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out["2.weight"], mean["2.weight"], atol=1e-4)


def test_regmean_row_at_alpha_one_is_the_least_squares_merge():
    """alpha 1: the second layer's weight minimises sum_k |X_k (W - W_k)^T|^2 / n_k, X_k that
    layer's inputs under expert k on its task's images (a float64 ``lstsq`` on the stacked rows)."""
    loaded, data = toy_pool(k=3)
    out = regmean(loaded, data, num_examples=24, batch_size=8, alpha=1.0)
    rows, targets = [], []
    for k, t in enumerate(loaded.task_vectors.task_names):
        theta = expert(loaded, k)
        x = torch.cat(list(adaptation_batches(data[t], 24, 8)))
        h = torch.tanh(x @ theta["0.weight"].T + theta["0.bias"])
        rows.append(h / 24 ** 0.5)
        targets.append(h @ theta["2.weight"].T / 24 ** 0.5)
    w = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(out["2.weight"], w, rtol=1e-8, atol=1e-10)


def test_regmean_hooks_every_linear_layer_of_a_vit():
    enc = TinyViT(image_size=8, patch=4, dim=8, depth=2, heads=2, out_dim=8)
    merged = {n for n, _ in enc.named_parameters()}
    found = set(linear_modules(enc, merged))
    assert found == {f"blocks.{i}.{m}" for i in range(2) for m in ("qkv", "proj", "fc1", "fc2")} | {"proj"}
    assert set(linear_modules(enc, merged - {"proj.weight"})) == found - {"proj"}


# ---------------------------------------------------------------------------------- RegMean++


def test_block_inputs_stop_at_the_block():
    loaded, data = toy_pool(k=1)
    batches = list(adaptation_batches(data["t0"], 16, 8))
    theta = expert(loaded, 0)
    calls = block_inputs(loaded.encoder, theta, "2", batches, torch.device("cpu"))
    assert len(calls) == 2 and all(kw == {} for _, kw in calls)
    for (args, _), x in zip(calls, batches):
        torch.testing.assert_close(args[0], torch.tanh(x @ theta["0.weight"].T + theta["0.bias"]))


def test_regmean_plusplus_one_task_alpha_zero_returns_the_expert():
    loaded, data = toy_pool(k=1, depth=3)
    out = regmean_plusplus(loaded, data, num_examples=16, batch_size=8, alpha=0.0)
    for n, want in expert(loaded, 0).items():
        torch.testing.assert_close(out[n], want, rtol=1e-12, atol=1e-12)


def test_regmean_plusplus_takes_each_block_input_from_the_merged_blocks_before_it():
    """alpha 1: block 0 sees the images, as in RegMean (the same merge); block 1's Gram is taken on
    the outputs of the *merged* block 0, so its weight is the least-squares fit of each expert's
    block 1 on those (RegMean would take each expert's own block-0 outputs)."""
    loaded, data = toy_pool(k=3)
    out = regmean_plusplus(loaded, data, num_examples=24, batch_size=8, alpha=1.0)
    plain = regmean(loaded, data, num_examples=24, batch_size=8, alpha=1.0)
    torch.testing.assert_close(out["0.weight"], plain["0.weight"], rtol=1e-10, atol=1e-12)
    rows, targets = [], []
    for k, t in enumerate(loaded.task_vectors.task_names):
        x = torch.cat(list(adaptation_batches(data[t], 24, 8)))
        h = torch.tanh(x @ out["0.weight"].T + out["0.bias"])
        rows.append(h / 24 ** 0.5)
        targets.append(h @ expert(loaded, k)["2.weight"].T / 24 ** 0.5)
    w = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(out["2.weight"], w, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(out["2.weight"], plain["2.weight"], atol=1e-4)
    mean = sum(expert(loaded, k)["2.bias"] for k in range(3)) / 3
    torch.testing.assert_close(out["2.bias"], mean, rtol=1e-12, atol=1e-12)


def test_regmean_plusplus_on_a_vit_block_by_block():
    """A TinyViT pool: blocks from its layout, keyword-free calls; one task at alpha 0 gives the expert."""
    from adamerge.models.layout import infer_layout
    enc = TinyViT(image_size=8, patch=4, dim=8, depth=2, heads=2, out_dim=8).double()
    names = [n for n, _ in enc.named_parameters()]
    g = torch.Generator().manual_seed(3)
    tv = TaskVectors(["a"], names, [0.1 * torch.randn((1, *p.shape), generator=g, dtype=torch.float64)
                                    for p in enc.parameters()])
    loaded = SimpleNamespace(encoder=enc, task_vectors=tv, heads={"a": nn.Identity()}, layout=infer_layout(enc))
    data = {"a": TensorDataset(torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64), torch.zeros(12))}
    out = regmean_plusplus(loaded, data, num_examples=12, batch_size=4, alpha=0.0)
    for n, want in expert(loaded, 0).items():
        torch.testing.assert_close(out[n], want, rtol=1e-10, atol=1e-12)


def test_regmean_plusplus_carries_block_outputs_forward_on_a_vit(monkeypatch):
    """On a ViT (blocks called one after the other) each block's inputs are the merged block before
    it run on that block's inputs: the encoder runs up to a block once per task for the first block
    and on one batch per later block (the check), with the result of running it up to every block."""
    import adamerge.methods.regmean as rm
    from adamerge.models.layout import infer_layout
    enc = TinyViT(image_size=8, patch=4, dim=8, depth=3, heads=2, out_dim=8).double()
    names = [n for n, _ in enc.named_parameters()]
    g = torch.Generator().manual_seed(5)
    tv = TaskVectors(["a", "b"], names, [0.1 * torch.randn((2, *p.shape), generator=g, dtype=torch.float64)
                                         for p in enc.parameters()])
    loaded = SimpleNamespace(encoder=enc, task_vectors=tv, heads={t: nn.Identity() for t in "ab"},
                             layout=infer_layout(enc))
    data = {t: TensorDataset(torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64), torch.zeros(12)) for t in "ab"}
    captured = []
    real = rm.block_inputs
    monkeypatch.setattr(rm, "block_inputs", lambda *a, **k: captured.append(len(a[3])) or real(*a, **k))
    fast = regmean_plusplus(loaded, data, num_examples=12, batch_size=4, alpha=0.95)
    assert captured == [3, 3, 1, 1]  # two tasks x 3 batches up to block 0, then one batch per check
    monkeypatch.setattr(rm, "next_block_inputs", lambda *a, **k: dict.fromkeys(a[3]))
    captured.clear()
    slow = regmean_plusplus(loaded, data, num_examples=12, batch_size=4, alpha=0.95)
    assert captured == [3, 3] * 3  # the encoder up to every block
    for n in slow:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-12, atol=1e-12)


def test_regmean_plusplus_runs_the_encoder_where_blocks_do_not_follow_each_other(monkeypatch):
    """The toy pool has a tanh between its blocks: the carried output is not the next input, the
    check says so, and the encoder is run up to each block (the merge of the test above)."""
    import adamerge.methods.regmean as rm
    loaded, data = toy_pool(k=2)
    captured = []
    real = rm.block_inputs
    monkeypatch.setattr(rm, "block_inputs", lambda *a, **k: captured.append(len(a[3])) or real(*a, **k))
    regmean_plusplus(loaded, data, num_examples=16, batch_size=8, alpha=1.0)
    assert captured == [2, 2, 1, 2, 2]

