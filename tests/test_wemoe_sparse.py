"""E-WEMoE (``wemoe_sparse``): WEMoE on magnitude-pruned MLP task vectors with one shared router."""

from __future__ import annotations

import math

import pytest
import torch

import adamerge.methods.sparsify as sparsify
from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import registry
from adamerge.methods.sparsify import magnitude_prune_task_vectors
from adamerge.methods.wemoe import WEMoE
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource

ROW = "wemoe_sparse"


def tiny() -> PreloadedPool:
    return PreloadedPool(SuitePool("tiny").load())


def tiny_images(n: int = 6) -> torch.Tensor:
    ds = SuiteSource("tiny").dataset("digits", "test")
    return torch.stack([ds[i][0] for i in range(n)])


def row_model(**overrides) -> WEMoE:
    """The ``wemoe_sparse`` registry row built on the tiny pool (its defaults, then ``overrides``)."""
    method = registry.get(ROW)
    return method.build(tiny(), **method.resolve(overrides))


def routed_names(model: WEMoE) -> list[str]:
    tv = model.merged.task_vectors
    return [n for n in tv.names if any(n.startswith(f"{layer}.") for pair in model.mlps for layer in pair)]


def fusionbench_mask(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """FusionBench's ``_magnitude_prune`` mask by hand, in float64: ``|w| > quantile(|w|, ratio)``
    with the quantile's linear interpolation between the sorted magnitudes."""
    mags = tensor.double().abs().reshape(-1)
    ordered = mags.sort().values
    pos = ratio * (mags.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, mags.numel() - 1)
    threshold = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
    return (mags > threshold).reshape(tensor.shape)


def test_the_row_defaults_are_fusionbench_and_the_module_is_named_after_it():
    method = registry.get(ROW)
    assert method.build is WEMoE and method.kind == "learned"
    d = method.defaults()
    assert (d["tv_prune_ratio"], d["shared_router"], d["lr"], d["lr_schedule"], d["batch_reduce"]) == \
        (0.9, True, 1e-4, "constant", True)
    assert (d["init_lambda"], d["scaling"], d["router_hidden_layers"]) == (0.3, 0.3, 2)
    assert method.steps == 1000 and method.paper_schedule() == {"batch_size": 16, "steps": 1000}
    assert method.profile()["models"] == "per input"
    model = row_model()
    assert registry.row_of(model)[0] == ROW
    assert registry.row_of(WEMoE(tiny()))[0] == "wemoe"
    assert len(model.routers) == 1  # one router shared by every block
    routings = [model.merged.module.get_submodule(first).routing for first, _ in model.mlps]
    assert len(routings) > 1 and all(r.router is model.routers[0] for r in routings)


def test_sparsity_zero_equals_wemoe_for_the_same_routers():
    torch.manual_seed(0)
    sparse = row_model(tv_prune_ratio=0.0)
    plain = WEMoE(tiny())
    with torch.no_grad():  # a router that tells samples apart, the same in every block of both
        for p in sparse.routers[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
        for router in plain.routers:
            router.load_state_dict(sparse.routers[0].state_dict())
    a, b = sparse.merged.task_vectors, plain.merged.task_vectors
    assert a.names == b.names and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert sparse.fingerprint == plain.fingerprint
    x = tiny_images()
    with torch.no_grad():
        ps, pp = sparse.merged.merged_parameters(), plain.merged.merged_parameters()
        assert all(torch.equal(ps[n], pp[n]) for n in pp)
        got, want = sparse.task_logits({"digits": x}, ps), plain.task_logits({"digits": x}, pp)
    torch.testing.assert_close(got["digits"], want["digits"], rtol=0, atol=1e-6)
    # and at the row's 90% the routed vectors, hence the logits, differ
    pruned = row_model()
    with torch.no_grad():
        pruned.routers[0].load_state_dict(sparse.routers[0].state_dict())
        other = pruned.task_logits({"digits": x}, pruned.merged.merged_parameters())["digits"]
    assert not torch.allclose(other, want["digits"], atol=1e-4)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_routed_task_vectors_keep_the_top_fraction_of_each_tensor_as_fusionbench(ratio):
    loaded = SuitePool("tiny").load()
    model = row_model(tv_prune_ratio=ratio)
    got, orig = model.merged.task_vectors, loaded.task_vectors
    routed = routed_names(model)
    assert routed and any(n.endswith(".bias") for n in routed)
    for name, tau, before in zip(got.names, got.tensors, orig.tensors):
        if name not in routed:  # outside the routed MLPs: the task vectors untouched
            assert torch.equal(tau, before), name
            continue
        for k in range(tau.shape[0]):  # per task, per tensor
            keep = fusionbench_mask(before[k], ratio)
            assert torch.equal(tau[k], torch.where(keep, before[k], torch.zeros_like(before[k]))), (name, k)
            n = before[k].numel()
            if before[k].abs().unique().numel() == n:  # distinct magnitudes: the top n-1-floor(r(n-1))
                assert int(keep.sum()) == n - 1 - math.floor(ratio * (n - 1)), (name, k)
    assert "magnitude_prune(ratio=" in model.fingerprint["transform"]


def test_magnitude_prune_by_hand():
    tau = torch.tensor([[[0.1, -0.5, 0.3, -0.2, 0.05]], [[1.0, 2.0, -3.0, 4.0, -5.0]]])  # [K=2, 1, 5]
    tv = TaskVectors(["a", "b"], ["w", "v"], [tau, tau.clone()], {})
    out = magnitude_prune_task_vectors(tv, 0.6, ["w"])
    # rank 0.6 * 4 = 2.4: thresholds 0.2 + 0.4 * 0.1 = 0.24 and 3 + 0.4 * 1 = 3.4; kept unscaled
    assert torch.equal(out.tensors[0], torch.tensor([[[0.0, -0.5, 0.3, 0.0, 0.0]], [[0.0, 0.0, 0.0, 4.0, -5.0]]]))
    assert torch.equal(out.tensors[1], tau) and out.meta["transform"] == "magnitude_prune(ratio=0.6,tensors=1)"
    assert magnitude_prune_task_vectors(tv, 0.0) is tv  # 0: nothing pruned
    assert not magnitude_prune_task_vectors(tv, 1.0).tensors[0].any()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        magnitude_prune_task_vectors(tv, 1.5)


def test_quantile_past_torch_limit_matches_torch_quantile(monkeypatch):
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(n, generator=g).abs(), q) for n in (1001, 4097, 777) for q in (0.9, 0.5, 0.37, 0.0, 1.0)]
    want = [torch.quantile(v, q) for v, q in cases]
    monkeypatch.setattr(sparsify, "_QUANTILE_NUMEL", 100)  # take the kthvalue path
    for (v, q), w in zip(cases, want):
        assert torch.equal(sparsify._quantile(v, q), w), (v.numel(), q)


def test_shared_router_trains_checkpoints_once_and_pruned_vectors_refuse_other_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = row_model()
    batch = {t: (tiny_images(4), torch.arange(4)) for t in model.task_names}
    model.adaptation_step(batch, 0).backward()
    grads = [p.grad for p in model.routers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert {k.split(".")[1] for k in model.extra_learned_state()} == {"0"}
    # a checkpoint of unpruned vectors (same shapes) is refused: the fingerprint names the pruning
    plain = WEMoE(tiny())
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {k: v.detach().clone() for k, v in plain.learned_state().items()},
                "adamerge": {"method": "wemoe", "fingerprint": plain.fingerprint, "granularity": "layerwise"}}, ckpt)
    with pytest.raises(Exception, match="transform|hash|norm|differ"):
        WEMoE(tiny(), tv_prune_ratio=0.5).load_coefficients(str(ckpt))
