"""DARE, Breadcrumbs, TALL masks, Consensus and EMR (adamerge.methods.sparsify) on tiny hand-built
task vectors: limits that reduce to task arithmetic / the base / the expert, and hand computations."""

import pytest
import torch
from torch import nn

from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods.sparsify import (breadcrumbs, breadcrumbs_task_vectors, consensus,
                                       consensus_task_vectors, dare, dare_task_vectors, emr,
                                       tall_mask_tensors, tall_masks)
from adamerge.methods.static import task_arithmetic
from adamerge.models.pool import LoadedPool

SHAPES = {"w": (6, 10), "b": (10,), "s": ()}


def random_tv(tasks=("a", "b", "c"), seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(len(tasks), *shape, generator=g) for shape in SHAPES.values()]
    base = {n: torch.randn(shape, generator=g) for n, shape in SHAPES.items()}
    return TaskVectors(list(tasks), list(SHAPES), tensors), base


def assert_merge_equal(got, expected):
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n])


class Encoder(nn.Module):
    """Parameters named like the task vectors, plus one parameter and one buffer not merged."""

    def __init__(self, params):
        super().__init__()
        for n, t in params.items():
            self.register_parameter(n, nn.Parameter(t.clone(), requires_grad=False))
        self.register_parameter("other", nn.Parameter(torch.arange(3.0), requires_grad=False))
        self.register_buffer("steps", torch.tensor(7))


def pool(tv, base):
    return LoadedPool(Encoder(base), tv, {t: nn.Linear(2, 2) for t in tv.task_names})


def check_state(state, loaded, expected):
    """``state`` is the encoder's full state dict with the merged parameters as ``expected``."""
    assert set(state) == set(loaded.encoder.state_dict())
    torch.testing.assert_close(state["other"], torch.arange(3.0))
    assert state["steps"].item() == 7
    for n, t in expected.items():
        torch.testing.assert_close(state[n], t)


# ------------------------------------------------------------------------------------ DARE

def test_dare_with_p_zero_is_task_arithmetic():
    tv, base = random_tv()
    assert_merge_equal(dare(tv, base, p=0.0, scaling=0.4), task_arithmetic(tv, base, scaling=0.4))


def test_dare_is_deterministic_per_seed_and_records_the_transform():
    tv, _ = random_tv()
    first, again = dare_task_vectors(tv, 0.5, seed=3), dare_task_vectors(tv, 0.5, seed=3)
    other = dare_task_vectors(tv, 0.5, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(first.tensors, again.tensors))
    assert not all(torch.equal(x, y) for x, y in zip(first.tensors, other.tensors))
    assert first.meta["transform"] == "dare(p=0.5,seed=3)"
    assert "transform" not in tv.meta  # input untouched


def test_dare_keeps_about_one_minus_p_and_rescales_the_kept():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(2, 100_000, generator=g)
    tv = TaskVectors(["a", "b"], ["w"], [tau.clone()])
    out = dare_task_vectors(tv, p=0.3, seed=0).tensors[0]
    kept = out != 0
    for k in range(2):  # each task dropped independently, about 30 % each
        assert abs(kept[k].float().mean().item() - 0.7) < 0.01
    assert not torch.equal(kept[0], kept[1])
    torch.testing.assert_close(out[kept], tau[kept] / 0.7)
    assert torch.equal(dare_task_vectors(tv, p=1.0).tensors[0], torch.zeros_like(tau))
    with pytest.raises(ValueError, match="p must be"):
        dare_task_vectors(tv, p=1.5)


# ----------------------------------------------------------------------------- Breadcrumbs

def test_breadcrumbs_keeping_everything_is_task_arithmetic():
    tv, base = random_tv()
    assert_merge_equal(breadcrumbs(tv, base, keep=1.0, top=0.0, scaling=0.3),
                       task_arithmetic(tv, base, scaling=0.3))


def test_breadcrumbs_keeps_exactly_the_band_of_each_row():
    row = torch.arange(1.0, 101.0)                      # magnitudes 1..100
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    w = torch.stack([row, -row[perm]])                  # second row: shuffled, negative
    tv = TaskVectors(["a", "b"], ["w", "s"], [torch.stack([w, 2 * w]), torch.tensor([5.0, -5.0])])
    out = breadcrumbs_task_vectors(tv, keep=0.2, top=0.05)
    # per row: the 5 largest (96..100) removed, the next 20 (76..95) kept, the rest zero
    band = (row >= 76) & (row <= 95)
    for k, scale in ((0, 1.0), (1, 2.0)):
        got = out.tensors[0][k]
        assert torch.equal(got[0], torch.where(band, row, 0.0) * scale)
        assert torch.equal(got[1] != 0, band[perm])
        assert torch.equal(got[1][band[perm]], -row[perm][band[perm]] * scale)
    assert torch.equal(out.tensors[1], tv.tensors[1])   # 0-d parameter untouched
    # keep beyond what the removal leaves: every entry but the 5 removed ones
    rest = breadcrumbs_task_vectors(tv, keep=1.0, top=0.05).tensors[0][0, 0]
    assert torch.equal(rest, torch.where(row <= 95, row, 0.0))
    assert out.meta["transform"] == "breadcrumbs(keep=0.2,top=0.05)"


# ----------------------------------------------------------------------- TALL masks, Consensus

def test_tall_mask_rule_by_hand():
    tau = torch.tensor([[1.0, 0.1, 1.0], [0.5, -1.0, 1.0]])
    tv = TaskVectors(["a", "b"], ["w"], [tau])
    # sum = [1.5, -0.9, 2]; |sum - tau_a| = [0.5, 1, 1], |sum - tau_b| = [1, 0.1, 1]
    (mask,) = tall_mask_tensors(tv, 0.6)
    assert mask.tolist() == [[True, False, True], [False, True, True]]
    # strict >: equal sides are off (lambda 1: |1| > 1 * |1| is false)
    (mask,) = tall_mask_tensors(tv, {"a": 1.0, "b": 0.05})
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    with pytest.raises(ValueError, match="missing"):
        tall_mask_tensors(tv, {"a": 0.5})


def test_consensus_limits_and_hand_case():
    tv, base = random_tv()
    assert_merge_equal(consensus(tv, base, k=0, scaling=0.3), task_arithmetic(tv, base, scaling=0.3))
    assert_merge_equal(consensus(tv, base, k=4), {n: base[n] for n in tv.names})
    tau = torch.tensor([[1.0, 0.1, 1.0], [0.5, -1.0, 1.0]])   # masks [[T, F, T], [F, T, T]]
    small = TaskVectors(["a", "b"], ["w"], [tau])
    assert torch.equal(consensus_task_vectors(small, k=2, lambdas=0.6).tensors[0],
                       torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(consensus_task_vectors(small, k=1, lambdas=0.6).tensors[0], tau)


def test_tall_masks_of_one_task_is_the_expert_and_of_two_masks_the_sum():
    tv, base = random_tv(("a",))
    loaded = pool(tv, base)
    builders = tall_masks(loaded)
    assert list(builders) == ["a"]
    check_state(builders["a"](), loaded, {n: base[n] + tv.tensors[i][0] for i, n in enumerate(tv.names)})
    tau = torch.tensor([[1.0, 0.1, 1.0], [0.5, -1.0, 1.0]])
    two = TaskVectors(["a", "b"], ["w"], [tau])
    loaded = pool(two, {"w": torch.zeros(3)})
    states = {t: f() for t, f in tall_masks(loaded, 0.6).items()}
    check_state(states["a"], loaded, {"w": torch.tensor([1.5, 0.0, 2.0])})
    check_state(states["b"], loaded, {"w": torch.tensor([0.0, -0.9, 2.0])})


# ----------------------------------------------------------------------------------------- EMR

def test_emr_of_one_task_is_the_expert():
    tv, base = random_tv(("a",))
    loaded = pool(tv, base)
    check_state(emr(loaded)["a"](), loaded, {n: base[n] + tv.tensors[i][0] for i, n in enumerate(tv.names)})


def test_emr_on_two_tasks_by_hand():
    a = torch.tensor([[1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -1.0, -4.0]])
    b = torch.tensor([[0.5, 0.5], [-1.0, 0.25]])
    tv = TaskVectors(["t1", "t2"], ["a", "b"], [a, b])
    base = {"a": torch.full((4,), 10.0), "b": torch.full((2,), -10.0)}
    loaded = pool(tv, base)
    # elected signs: a: sum [3, -1, 2, -4] -> [+, -, +, -]; b: sum [-0.5, 0.75] -> [-, +]
    # masks: t1 a [T, T, T, F], b [F, T]; t2 a [T, F, F, T], b [T, T]
    # unified: a [2, -2, 3, -4], b [-1, 0.5]
    # rescalers (sums of per-tensor mean magnitudes): t1 (1.5 + 0.5) / (1.75 + 0.25) = 1,
    #   t2 (2 + 0.625) / (1.5 + 0.75) = 7/6  (sum|tau| / sum|m u| over all entries would be 37/30)
    states = {t: f() for t, f in emr(loaded).items()}
    check_state(states["t1"], loaded, {"a": base["a"] + torch.tensor([2.0, -2.0, 3.0, 0.0]),
                                       "b": base["b"] + torch.tensor([0.0, 0.5])})
    check_state(states["t2"], loaded, {"a": base["a"] + 7 / 6 * torch.tensor([2.0, 0.0, 0.0, -4.0]),
                                       "b": base["b"] + 7 / 6 * torch.tensor([-1.0, 0.5])})


def test_transforms_keep_shapes_dtypes_and_inputs():
    tv, _ = random_tv()
    low = tv.to(dtype=torch.bfloat16)
    before = [t.clone() for t in low.tensors]
    for out in (dare_task_vectors(low), breadcrumbs_task_vectors(low), consensus_task_vectors(low)):
        assert out.names == low.names and out.task_names == low.task_names
        assert [(t.shape, t.dtype) for t in out.tensors] == [(t.shape, t.dtype) for t in low.tensors]
    assert all(torch.equal(a, b) for a, b in zip(before, low.tensors))


def test_compare_picks_tall_lambdas_per_task_and_reports_profiles(tmp_path):
    """Per-task methods with a ``tune`` grid pick one value per task on that task's val split."""
    from adamerge.compare import CompareSettings, compare
    from adamerge.data.datamodule import MultiTaskDataModule
    from adamerge.methods import registry
    from adamerge.report import evaluate
    from adamerge.suites.synthetic import SuitePool, SuiteSource
    loaded = SuitePool("tiny").load()
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, eval_batch_size=256)
    settings = CompareSettings(steps=1, grids={"tall_masks": {"lambdas": (0.2, 0.6)}})
    results = compare(loaded, dm, tmp_path, settings, methods=["tall_masks", "emr"], suite="tiny", say=lambda _: None)
    picked = results["tuned"]["tall_masks"]["lambdas"]
    assert set(picked) == {"digits", "shapes", "gratings"} and set(picked.values()) <= {0.2, 0.6}
    src = SuiteSource("tiny")
    for task, params in tall_masks(loaded, lambdas=picked).items():
        own = evaluate(loaded.encoder, params(), loaded.heads, {task: src.dataset(task, "test")})[task]
        assert results["methods"]["tall_masks"]["per_task"][task] == pytest.approx(own)
        val = {lam: evaluate(loaded.encoder, tall_masks(loaded, lambdas=lam)[task](), loaded.heads,
                             {task: src.dataset(task, "val")})[task] for lam in (0.2, 0.6)}
        assert val[picked[task]] == max(val.values())
    assert results["profiles"]["emr"]["models"] == "K" and registry.get("emr").profile()["data"] == "-"
