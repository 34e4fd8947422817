"""Low-rank (LoRA) task vectors: merge and gradients against dense and explicit references,
buffers, dtypes, errors, fingerprints and memory."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from adamerge.engine import LowRankMergedModel, LowRankTaskVectors, MergedModel
from adamerge.engine.lowrank import _LowRankMerge
from adamerge.engine.task_vectors import fingerprint_difference

TASKS = ["a", "b", "c"]
# Different ranks per task; task "b" has no adapter on "4.weight" (rank 0 there).
RANKS = {"a": {"0.weight": 2, "2.weight": 2, "4.weight": 2},
         "b": {"0.weight": 3, "2.weight": 1},
         "c": {"0.weight": 1, "2.weight": 4, "4.weight": 3}}
ALPHA = 4.0


def tiny_module(seed: int = 0) -> nn.Sequential:
    # out < in, out > in and out < in again: both GEMM associations are exercised.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def adapters_for(module: nn.Module, ranks=RANKS, seed: int = 1, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    out = {}
    for task, per_param in ranks.items():
        out[task] = {}
        for name, r in per_param.items():
            o, i = params[name].shape
            out[task][name] = (std * torch.randn(o, r, generator=g), std * torch.randn(r, i, generator=g),
                               ALPHA / r)
    return out


def setup(granularity: str = "layerwise", seed: int = 0):
    module = tiny_module(seed)
    adapters = adapters_for(module, seed=seed + 1)
    lr = LowRankTaskVectors.from_adapters(adapters, task_names=TASKS)
    return module, adapters, lr


def set_coefficients(*models: MergedModel, seed: int = 3) -> torch.Tensor:
    """The same coefficients, some below 0 and some above 1, in every model."""
    shape = models[0].coefficients.shape
    values = torch.empty(shape).uniform_(-0.6, 1.6, generator=torch.Generator().manual_seed(seed))
    values.view(-1)[:2] = torch.tensor([-0.4, 1.3])  # at least one on each side, whatever the seed
    with torch.no_grad():
        for m in models:
            m.coefficients.copy_(values)
    return values


def explicit_merge(module: nn.Module, adapters, names, lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """``W0 + sum_k lam[row, k] * scale_k * B_k @ A_k`` with plain autograd ops."""
    params = dict(module.named_parameters())
    merged = {}
    for p, name in enumerate(names):
        row = lam[p] if lam.shape[0] > 1 else lam[0]
        w = params[name].detach().clone()
        for k, task in enumerate(TASKS):
            if name in adapters[task]:
                b, a, scale = adapters[task][name]
                w = w + row[k] * scale * (b @ a)
        merged[name] = w
    return merged


def inputs(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_from_adapters_layout():
    module, adapters, lr = setup()
    assert lr.names == sorted(RANKS["a"]) and lr.task_names == TASKS
    assert lr.ranks == [[2, 3, 1], [2, 1, 4], [2, 0, 3]]
    assert [tuple(b.shape) for b in lr.b] == [(5, 6), (7, 7), (3, 5)]
    assert [tuple(a.shape) for a in lr.a] == [(6, 6), (7, 5), (5, 7)]
    assert lr.scales.dtype == torch.float32 and lr.scales[2, 1] == 0
    b, a, scale = adapters["c"]["2.weight"]
    torch.testing.assert_close(lr.delta(1, "c"), scale * b @ a)
    assert torch.count_nonzero(lr.delta(2, "b")) == 0


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_lowrank_merge_equals_dense_merge(granularity):
    module, adapters, lr = setup()
    low = LowRankMergedModel(module, lr, granularity, clamp=True)
    dense = MergedModel(module, lr.to_dense(), granularity, clamp=True)
    values = set_coefficients(low, dense)
    assert (values < 0).any() and (values > 1).any()
    assert low.coefficients.shape == ((3, 3) if granularity == "layerwise" else (1, 3))
    merged, ref = low.merged_parameters(), dense.merged_parameters()
    assert list(merged) == list(ref)
    for name in ref:
        torch.testing.assert_close(merged[name], ref[name], rtol=0, atol=1e-5)
    # and the clamped formula, from the original adapters
    expected = explicit_merge(module, adapters, lr.names, values.clamp(0, 1))
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-5)
    x = inputs()
    (low(x).sin().sum() + low(x).pow(2).sum()).backward()
    (dense(x).sin().sum() + dense(x).pow(2).sum()).backward()
    torch.testing.assert_close(low.coefficients.grad, dense.coefficients.grad, rtol=1e-4, atol=1e-6)
    assert low.coefficients.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_coefficient_gradients_match_explicit_autograd(granularity):
    module, adapters, lr = setup()
    low = LowRankMergedModel(module, lr, granularity, clamp=False)
    values = set_coefficients(low, seed=5)
    x = inputs(6, seed=2)
    low(x).tanh().pow(3).sum().backward()
    lam = values.clone().requires_grad_()
    merged = explicit_merge(module, adapters, lr.names, lam)
    functional_call(module, merged, (x,)).tanh().pow(3).sum().backward()
    torch.testing.assert_close(low.coefficients.grad, lam.grad, rtol=1e-4, atol=1e-6)
    if granularity == "layerwise":  # the rank-0 cell gets no gradient, the others do
        assert low.coefficients.grad[2, 1] == 0
        assert torch.count_nonzero(low.coefficients.grad) == 8
    else:
        assert torch.count_nonzero(low.coefficients.grad) == 3


@pytest.mark.parametrize("layerwise", [False, True])
def test_autograd_function_gradcheck(layerwise):
    g = torch.Generator().manual_seed(0)
    shapes, ranks = [(3, 5), (6, 2), (4, 4)], [[2, 0, 1], [1, 3, 2], [0, 0, 2]]
    bases = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    bs = tuple(torch.randn(s[0], sum(r), generator=g, dtype=torch.float64) for s, r in zip(shapes, ranks))
    as_ = tuple(torch.randn(sum(r), s[1], generator=g, dtype=torch.float64) for s, r in zip(shapes, ranks))
    lr = LowRankTaskVectors(["x", "y", "z"], ["p0", "p1", "p2"], list(bs), list(as_), ranks,
                            torch.rand(3, 3, generator=g) + 0.5)
    rows = torch.arange(3) if layerwise else torch.zeros(3, dtype=torch.long)
    coeffs = torch.randn(3 if layerwise else 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    segments = tuple(lr.segments())

    def merge(c):
        return _LowRankMerge.apply(c, rows, lr.scales, bases, bs, as_, segments, None)

    assert torch.autograd.gradcheck(merge, (coeffs,), eps=1e-6, atol=1e-6)
    # the forward is the formula, too
    for p, w in enumerate(merge(coeffs.detach())):
        row = coeffs.detach()[rows[p]]
        expected = bases[p] + sum(row[k] * lr.delta(p, k).double() for k in range(3))
        torch.testing.assert_close(w, expected)


def test_reuse_buffers_across_steps():
    module, adapters, lr = setup()
    low = LowRankMergedModel(module, lr, "layerwise")
    fresh = LowRankMergedModel(module, lr, "layerwise")
    opt = torch.optim.SGD(low.parameters(), lr=0.5)
    x = inputs()
    held = []
    for _ in range(2):
        with torch.no_grad():
            fresh.coefficients.copy_(low.coefficients)
        merged = low.merged_parameters(reuse_buffers=True)
        held.append(merged)
        ref = fresh.merged_parameters()
        for name in ref:
            torch.testing.assert_close(merged[name], ref[name], rtol=0, atol=0)
        opt.zero_grad()
        fresh.coefficients.grad = None
        low(x, params=merged).pow(2).sum().backward()
        fresh(x, params=ref).pow(2).sum().backward()
        torch.testing.assert_close(low.coefficients.grad, fresh.coefficients.grad, rtol=0, atol=0)
        opt.step()
    # the second step wrote into the first step's tensors (same memory, same values)
    for name in held[0]:
        assert held[0][name].data_ptr() == held[1][name].data_ptr()
        assert torch.equal(held[0][name], held[1][name])
    # a graph still holding an overwritten buffer fails loudly, never silently wrong
    stale = low(x, params=low.merged_parameters(reuse_buffers=True)).pow(2).sum()
    low.merged_parameters(reuse_buffers=True)
    with pytest.raises(RuntimeError, match="inplace"):
        stale.backward()


def test_bfloat16_adapters_with_float32_base():
    module, adapters, lr = setup()
    half = lr.to(dtype=torch.bfloat16)
    assert half.b[0].dtype == torch.bfloat16 and half.scales.dtype == torch.float32
    low = LowRankMergedModel(module, half, "layerwise")
    dense = MergedModel(module, half.to(dtype=torch.float32).to_dense(), "layerwise")
    exact = LowRankMergedModel(module, lr, "layerwise")
    set_coefficients(low, dense, exact)
    merged = low.merged_parameters()
    for name, ref in dense.merged_parameters().items():
        assert merged[name].dtype == torch.float32
        # computed in float32 from the bf16 values: as exact as the dense float32 merge
        torch.testing.assert_close(merged[name], ref, rtol=0, atol=1e-5)
        # and close to the float32 adapters (bf16 rounding of the factors only)
        torch.testing.assert_close(merged[name], exact.merged_parameters()[name], rtol=0, atol=5e-2)
    x = inputs()
    low(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    assert low.coefficients.grad.dtype == torch.float32
    torch.testing.assert_close(low.coefficients.grad, dense.coefficients.grad, rtol=1e-3, atol=1e-5)


def test_module_to_moves_adapters_and_offload_keeps_them():
    module, adapters, lr = setup()
    low = LowRankMergedModel(module, lr, "taskwise").double()
    assert low.task_vectors.b[0].dtype == torch.float64 and low.task_vectors.scales.dtype == torch.float32
    assert lr.b[0].dtype == torch.float32  # the caller's object is untouched
    merged = low.merged_parameters()
    assert merged["0.weight"].dtype == torch.float64
    expected = explicit_merge(module, adapters, lr.names, low.lambdas().detach())
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-5)

    off = LowRankMergedModel(tiny_module(), lr, "taskwise", offload=True).double()
    assert off.task_vectors.b[0].dtype == torch.float32  # left where it was, converted per merge
    assert off.merged_parameters()["2.weight"].dtype == torch.float64


def test_state_dict_table_and_names():
    module, adapters, lr = setup()
    low = LowRankMergedModel(module, lr, "layerwise")
    set_coefficients(low)
    sd = low.merged_state_dict()
    assert set(sd) == set(module.state_dict())
    assert all(not t.requires_grad for t in sd.values())
    clone = tiny_module(seed=7)
    clone.load_state_dict(sd)
    torch.testing.assert_close(clone(inputs()), low(inputs()).detach())
    assert low.task_names == TASKS
    assert low.coefficient_table() == {t: low.lambdas()[:, k].tolist() for k, t in enumerate(TASKS)}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line_and_name_the_parameter():
    module, adapters, lr = setup()
    # wrong shape: "2.weight" is [7, 5]; an adapter built for [5, 7]
    bad = {t: dict(v) for t, v in adapters.items()}
    bad["a"]["2.weight"] = (torch.zeros(5, 2), torch.zeros(2, 7), 1.0)
    bad["c"]["2.weight"] = (torch.zeros(5, 1), torch.zeros(1, 7), 1.0)
    bad["b"]["2.weight"] = (torch.zeros(5, 1), torch.zeros(1, 7), 1.0)
    with pytest.raises(ValueError) as err:
        LowRankMergedModel(module, LowRankTaskVectors.from_adapters(bad), "layerwise")
    assert all(s in one_line(err) for s in ("'2.weight'", "(5, 7)", "(7, 5)"))
    # tasks disagreeing on a parameter's shape
    bad["a"]["0.weight"] = (torch.zeros(4, 2), torch.zeros(2, 6), 1.0)
    with pytest.raises(ValueError) as err:
        LowRankTaskVectors.from_adapters(bad)
    assert "'0.weight'" in one_line(err)
    # unknown parameter name
    unknown = {t: dict(v) for t, v in adapters.items()}
    unknown["a"]["9.weight"] = (torch.zeros(3, 1), torch.zeros(1, 3), 1.0)
    with pytest.raises(ValueError) as err:
        LowRankMergedModel(module, LowRankTaskVectors.from_adapters(unknown), "layerwise")
    assert "'9.weight'" in one_line(err) and "not a parameter" in one_line(err)
    # a 1-D parameter is not a weight
    bias = {"a": {"0.bias": (torch.zeros(5, 1), torch.zeros(1, 1), 1.0)}}
    with pytest.raises(ValueError) as err:
        LowRankMergedModel(module, LowRankTaskVectors.from_adapters(bias), "layerwise")
    assert "'0.bias'" in one_line(err)
    # mismatched ranks: the ranks do not add up to the factors' width
    ranks = [list(r) for r in lr.ranks]
    ranks[1][2] += 1
    with pytest.raises(ValueError) as err:
        LowRankTaskVectors(TASKS, lr.names, lr.b, lr.a, ranks, lr.scales)
    assert "'2.weight'" in one_line(err) and "ranks" in one_line(err)
    # B and A of one adapter with different ranks
    mism = {"a": {"0.weight": (torch.zeros(5, 2), torch.zeros(3, 6), 1.0)}}
    with pytest.raises(ValueError) as err:
        LowRankTaskVectors.from_adapters(mism)
    assert "'0.weight'" in one_line(err)
    # a rank list of the wrong length, scales of the wrong shape
    with pytest.raises(ValueError) as err:
        LowRankTaskVectors(TASKS, lr.names, lr.b, lr.a, [r[:2] for r in lr.ranks], lr.scales)
    assert "'0.weight'" in one_line(err)
    with pytest.raises(ValueError) as err:
        LowRankTaskVectors(TASKS, lr.names, lr.b, lr.a, lr.ranks, lr.scales[:, :2])
    assert "(3, 2)" in one_line(err)


def test_fingerprint():
    module, adapters, lr = setup()
    fp = lr.fingerprint()
    dense_fp = lr.to_dense().fingerprint()
    assert set(fp) == set(dense_fp) and fp["tasks"] == TASKS
    assert fp["params"] == dense_fp["params"]
    for t in TASKS:  # the same dense-delta norms, without forming the deltas
        assert float(fp["task_norms"][t]) == pytest.approx(float(dense_fp["task_norms"][t]), rel=1e-3)
    # stable across .to() round trips
    assert lr.to("cpu").fingerprint() == fp
    assert lr.to(dtype=torch.float64).to(dtype=torch.float32).fingerprint() == fp
    assert fingerprint_difference(fp, lr.to(dtype=torch.float64).fingerprint()) is None
    # a changed value
    b = [t.clone() for t in lr.b]
    b[1][3, 2] += 0.5
    changed = LowRankTaskVectors(TASKS, lr.names, b, lr.a, lr.ranks, lr.scales).fingerprint()
    assert changed["hash"] != fp["hash"]
    assert "weights differ" in fingerprint_difference(fp, changed)
    # a changed scale, and a flipped sign (negated delta, same norms and factor values)
    for p, k, factor in [(0, 1, 2.0), (2, 2, -1.0)]:
        scales = lr.scales.clone()
        scales[p, k] *= factor
        other = LowRankTaskVectors(TASKS, lr.names, lr.b, lr.a, lr.ranks, scales).fingerprint()
        assert other["hash"] != fp["hash"]
    # changed ranks (same factors, split differently between tasks)
    ranks = [list(r) for r in lr.ranks]
    ranks[0][0], ranks[0][1] = ranks[0][0] + 1, ranks[0][1] - 1
    assert LowRankTaskVectors(TASKS, lr.names, lr.b, lr.a, ranks, lr.scales).fingerprint()["hash"] != fp["hash"]


def test_lowrank_storage_is_much_smaller_than_dense():
    torch.manual_seed(0)
    module = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    k, r = 8, 4
    adapters = {f"t{j}": {f"{i}.weight": (torch.randn(256, r), torch.randn(r, 256), 2.0) for i in range(4)}
                for j in range(k)}
    lr = LowRankTaskVectors.from_adapters(adapters)
    # nbytes() reports at least what the factors really hold
    held = sum(t.untyped_storage().nbytes() for t in (*lr.b, *lr.a))
    assert held == 4 * 2 * 256 * k * r * 4 and lr.nbytes() >= held
    dense = lr.to_dense()
    dense_bytes = sum(t.untyped_storage().nbytes() for t in dense.tensors)
    assert dense_bytes == dense.nbytes() == 4 * k * 256 * 256 * 4  # really materialised
    assert lr.nbytes() < dense_bytes / 4
    # and the merged model holds no dense delta either
    low = LowRankMergedModel(module, lr, "layerwise")
    assert low.task_vectors.nbytes() == lr.nbytes()
