"""Merge math, coefficient gradients, clamping and input immutability."""

import pytest
import torch

from adamerge.engine.merged_model import MergedModel
from conftest import RandomPool, images


def make(granularity: str, prior: float = 0.3, clamp: bool = True, pool=None):
    loaded = (pool or RandomPool()).load()
    return MergedModel(loaded.encoder, loaded.task_vectors, granularity, prior, clamp), loaded


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_merged_parameters_match_formula(granularity):
    model, loaded = make(granularity)
    with torch.no_grad():
        model.coefficients.uniform_(0, 1, generator=torch.Generator().manual_seed(1))
    lam = model.coefficients.detach()
    merged = model.merged_parameters()
    base = dict(loaded.encoder.named_parameters())
    for p, (name, tau) in enumerate(zip(loaded.task_vectors.names, loaded.task_vectors.tensors)):
        row = lam[p] if granularity == "layerwise" else lam[0]
        expected = base[name] + sum(row[k] * tau[k] for k in range(tau.shape[0]))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert model.coefficients.shape == ((len(loaded.task_vectors.names), 3)
                                        if granularity == "layerwise" else (1, 3))


def test_merged_state_dict_is_plain_and_complete():
    model, loaded = make("layerwise")
    sd = model.merged_state_dict()
    assert set(sd) == set(loaded.encoder.state_dict())
    assert all(not t.requires_grad and t.grad_fn is None for t in sd.values())
    # forward of the module loaded with the exported weights equals the functional forward
    x = images(4)
    ref = model(x).detach()
    clone = type(loaded.encoder)(image_size=8, patch=4, dim=16, depth=1, heads=2, out_dim=16)
    clone.load_state_dict(sd)
    torch.testing.assert_close(clone.eval()(x), ref)


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_coefficient_gradient_is_dot_product(granularity):
    model, loaded = make(granularity)
    x = images(6)
    loss = model(x).pow(2).sum() + model(x).sin().sum()
    loss.backward()
    # independently: gradient w.r.t. the merged tensors, then dot products with the task vectors
    merged = {n: t.detach().requires_grad_() for n, t in model.merged_parameters().items()}
    from torch.func import functional_call
    out = functional_call(loaded.encoder, merged, (x,))
    out2 = functional_call(loaded.encoder, merged, (x,))
    g = torch.autograd.grad(out.pow(2).sum() + out2.sin().sum(), list(merged.values()))
    K = len(loaded.task_vectors.task_names)
    per_param = torch.stack([torch.stack([(gp * tau[k]).sum() for k in range(K)])
                             for gp, tau in zip(g, loaded.task_vectors.tensors)])
    expected = per_param if granularity == "layerwise" else per_param.sum(0, keepdim=True)
    torch.testing.assert_close(model.coefficients.grad, expected, rtol=1e-4, atol=1e-6)


def test_clamp_limits_merge_and_zeroes_outside_gradients():
    model, loaded = make("layerwise")
    with torch.no_grad():
        model.coefficients[:, 0] = 1.7
        model.coefficients[:, 1] = -0.4
    merged = model.merged_parameters()
    name, tau = loaded.task_vectors.names[0], loaded.task_vectors.tensors[0]
    base = dict(loaded.encoder.named_parameters())[name]
    torch.testing.assert_close(merged[name], base + tau[0] + 0.3 * tau[2])
    model(images(2)).sum().backward()
    assert torch.all(model.coefficients.grad[:, :2] == 0)
    assert torch.any(model.coefficients.grad[:, 2] != 0)
    unclamped, _ = make("layerwise", clamp=False)
    with torch.no_grad():
        unclamped.coefficients[:, 0] = 1.7
    unclamped(images(2)).sum().backward()
    assert torch.any(unclamped.coefficients.grad[:, 0] != 0)


def test_inputs_are_not_mutated_and_base_is_frozen():
    pool = RandomPool()
    loaded = pool.load()
    base_before = {k: v.clone() for k, v in loaded.encoder.state_dict().items()}
    tv_before = [t.clone() for t in loaded.task_vectors.tensors]
    model = MergedModel(loaded.encoder, loaded.task_vectors)
    opt = torch.optim.Adam([model.coefficients], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(images(4)).sum().backward()
        opt.step()
    assert all(torch.equal(base_before[k], v) for k, v in loaded.encoder.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(tv_before, loaded.task_vectors.tensors))
    assert all(not p.requires_grad for p in loaded.encoder.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["coefficients"]


def test_low_precision_task_vectors_close_to_fp32():
    loaded = RandomPool().load()
    fp32 = MergedModel(loaded.encoder, loaded.task_vectors)
    bf16 = MergedModel(loaded.encoder, loaded.task_vectors.to(dtype=torch.bfloat16))
    assert loaded.task_vectors.to(dtype=torch.bfloat16).nbytes() * 2 == loaded.task_vectors.nbytes()
    x = images(3)
    torch.testing.assert_close(bf16(x), fp32(x), rtol=2e-2, atol=2e-2)
    bf16(x).sum().backward()
    fp32(x).sum().backward()
    torch.testing.assert_close(bf16.coefficients.grad, fp32.coefficients.grad, rtol=5e-2, atol=5e-3)


def test_bad_granularity_and_foreign_task_vector():
    loaded = RandomPool().load()
    with pytest.raises(ValueError, match="granularity"):
        MergedModel(loaded.encoder, loaded.task_vectors, granularity="blockwise")
    tv = loaded.task_vectors
    tv.names[0] = "not.a.param"
    with pytest.raises(ValueError, match="not.a.param"):
        MergedModel(loaded.encoder, tv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_merges_and_differentiates(dtype):
    model32, loaded = make("layerwise")
    low = MergedModel(loaded.encoder, loaded.task_vectors.to(dtype=dtype), "layerwise")
    x = images(4)
    for m in (model32, low):
        m(x).pow(2).sum().backward()
    for name, a in model32.merged_parameters().items():
        b = low.merged_parameters()[name]
        assert b.dtype == torch.float32  # added in the base's dtype
        torch.testing.assert_close(b, a, rtol=1e-2, atol=5e-4)  # bf16: 8 bits of mantissa
    torch.testing.assert_close(low.coefficients.grad, model32.coefficients.grad, rtol=2e-2, atol=1e-4)


def test_reused_buffers_give_the_same_steps_and_never_a_silently_wrong_gradient():
    model, _ = make("layerwise")
    fresh, _ = make("layerwise")
    x = images(4)
    for _ in range(2):  # two steps into the same buffers equal two fresh merges
        for m, reuse in ((model, True), (fresh, False)):
            m.coefficients.grad = None
            m(x, params=m.merged_parameters(reuse_buffers=reuse)).sum().backward()
        torch.testing.assert_close(model.coefficients.grad, fresh.coefficients.grad)
    # a graph still holding the previous merge fails loudly once the buffers are overwritten
    loss = model(x, params=model.merged_parameters(reuse_buffers=True)).pow(2).sum()
    model.merged_parameters(reuse_buffers=True)
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


@pytest.mark.parametrize("numel", [3 * (1 << 16), (1 << 16) + 8, (1 << 17) + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_merge_and_projection_equal_the_single_product(numel, dtype):
    # Large CPU parameters take the blocked path (16, 8 or 1 blocks for these sizes); the result
    # must be the plain matrix-vector product's.
    from adamerge.engine.merged_model import BLOCK_MIN_NUMEL, _blocks, _combine, _project
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(5, numel, generator=g).to(dtype)
    base, grad = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
    lam = torch.rand(5, generator=g).to(dtype)
    assert numel >= BLOCK_MIN_NUMEL and _blocks(tau) == {3 * (1 << 16): 16, (1 << 16) + 8: 8}.get(numel, 1)
    out = torch.empty(numel)
    _combine(base, tau, lam, out)
    low = dtype != torch.float32
    torch.testing.assert_close(out, base + (lam.float()[:, None] * tau.float()).sum(0),
                               rtol=1e-2 if low else 1e-5, atol=2e-2 if low else 1e-5)
    tol = dict(rtol=2e-2, atol=2.0) if low else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(_project(tau, grad.to(dtype)).float(), tau.double() @ grad.to(dtype).double(),
                               **tol, check_dtype=False)
