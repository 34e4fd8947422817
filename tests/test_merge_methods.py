"""Static merges and the TIES transform against hand computations."""

import pytest
import torch

from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import registry
from adamerge.methods.static import task_arithmetic, ties, ties_task_vectors, weight_averaging


def toy():
    tau = torch.tensor([[1.0, -2.0, 0.1, 3.0, -0.2],
                        [-1.5, -1.0, 0.3, 0.05, 0.4],
                        [0.2, 2.5, -0.1, 1.0, -3.0]])
    tv = TaskVectors(["a", "b", "c"], ["w"], [tau])
    return tv, {"w": torch.ones(5)}


def test_weight_averaging_and_task_arithmetic():
    tv, base = toy()
    torch.testing.assert_close(weight_averaging(tv, base)["w"], 1 + tv.tensors[0].mean(0))
    torch.testing.assert_close(task_arithmetic(tv, base, scaling=0.5)["w"], 1 + 0.5 * tv.tensors[0].sum(0))


def test_ties_trim_elect_disjoint_by_hand():
    tv, base = toy()
    # keep 40% of 5 entries = the 2 largest magnitudes of each task vector
    sel = ties_task_vectors(tv, keep=0.4).tensors[0]
    trimmed = torch.tensor([[0, -2.0, 0, 3.0, 0], [-1.5, -1.0, 0, 0, 0], [0, 2.5, 0, 0, -3.0]])
    sign = torch.sign(trimmed.sum(0))  # [-1, -1, 0, +1, -1]
    expected = torch.where(torch.sign(trimmed) == sign, trimmed, torch.zeros(()))
    torch.testing.assert_close(sel, expected)
    merged = ties(tv, base, keep=0.4, scaling=1.0)["w"]
    count = (expected != 0).sum(0).clamp(min=1)
    torch.testing.assert_close(merged, 1 + expected.sum(0) / count)
    # the input is not modified
    torch.testing.assert_close(tv.tensors[0], toy()[0].tensors[0])


def test_ties_disjoint_sum_of_the_official_adamerging_baseline():
    """``merge="sum"`` at 0.3 (src/main_ties_merging.py: "dis-sum", 0.3) by hand: column 1 keeps
    -2.0 and -1.0 (sign -), column 3 keeps 3.0, column 4 keeps -3.0; column 0 keeps -1.5."""
    tv, base = toy()
    merged = ties(tv, base, keep=0.4, scaling=0.3, merge="sum")["w"]
    torch.testing.assert_close(merged, 1 + 0.3 * torch.tensor([-1.5, -3.0, 0.0, 3.0, -3.0]))
    with pytest.raises(ValueError, match="merge must be 'mean' or 'sum'"):
        ties(tv, base, merge="max")


def test_ties_transform_is_in_fingerprint_and_keep_checked():
    tv, _ = toy()
    assert ties_task_vectors(tv, 0.2).fingerprint()["transform"] == "ties(keep=0.2)"
    with pytest.raises(ValueError, match="keep must be in"):
        ties_task_vectors(tv, 0.0)


def test_static_methods_of_the_registry_share_one_signature():
    tv, base = toy()
    static = registry.names("static")
    assert {"weight_averaging", "task_arithmetic", "ties"} <= set(static)
    for name in static:
        method = registry.get(name)
        out = method.build(tv, base, **method.defaults())
        assert set(out) <= {"w"} and all(v.shape == (5,) for v in out.values()), name
