"""``split_qkv``: three layer-wise coefficient rows (q, k, v) for each fused q/k/v parameter."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.engine.merged_model import BLOCK_MIN_NUMEL, MergedModel
from adamerge.engine.task_vectors import TaskVectors
from adamerge.io.checkpoints import read_checkpoint
from adamerge.io.run_checkpoint import RunCheckpoint
from adamerge.methods.adamerging import COEFFICIENTS_KEY
from conftest import RandomPool
from test_adamerging import random_data, trainer

TASKS = ("a", "b", "c")


def open_clip_vit() -> tuple[nn.Module, TaskVectors, torch.Tensor]:
    """A small open_clip VisionTransformer with random weights, three random task vectors, images."""
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    enc = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                            output_dim=32).eval()
    return enc, task_vectors_of(enc), torch.randn(3, 3, 32, 32)


def multihead_attention() -> tuple[nn.Module, TaskVectors, tuple[torch.Tensor, ...]]:
    """One ``nn.MultiheadAttention`` large enough that each q/k/v chunk is merged in column blocks
    on the CPU (the batched path of ``_combine`` / ``_project``)."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(256, 4, batch_first=True).eval()
    assert mha.in_proj_weight.numel() // 3 >= BLOCK_MIN_NUMEL
    x = torch.randn(2, 5, 256)
    return mha, task_vectors_of(mha), (x, x, x)


def task_vectors_of(module: nn.Module) -> TaskVectors:
    base = {k: v.clone() for k, v in module.state_dict().items()}
    experts = {t: {k: v + 0.02 * torch.randn_like(v) for k, v in base.items()} for t in TASKS}
    return TaskVectors.from_state_dicts(base, experts, names=[n for n, _ in module.named_parameters()])


def build(which: str):
    module, tv, x = open_clip_vit() if which == "open_clip" else multihead_attention()
    return module, tv, (x if isinstance(x, tuple) else (x,))


def features(model: MergedModel, args, params=None) -> torch.Tensor:
    out = model(*args, params=params)
    return out[0] if isinstance(out, tuple) else out  # nn.MultiheadAttention: (output, weights)


def is_fused(name: str) -> bool:
    return name.endswith(("in_proj_weight", "in_proj_bias"))


def random_coefficients(model: MergedModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # inside (0, 1): clamping passes gradients everywhere
        model.coefficients.copy_(0.1 + 0.8 * torch.rand(model.coefficients.shape, generator=g))


def naive_params(module: nn.Module, tv: TaskVectors, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``theta_p = base_p + sum_k lambda[row, k] tau_k,p`` with three rows (concatenated thirds
    along dim 0) for each fused parameter, in plain autograd-tracked operations."""
    params, row = dict(module.named_parameters()), 0
    out = {}
    for name, tau in zip(tv.names, tv.tensors):
        base = params[name]
        if is_fused(name):
            parts = []
            for j, (b, t) in enumerate(zip(base.chunk(3), tau.chunk(3, dim=1))):
                parts.append(b + torch.einsum("k,k...->...", coeffs[row + j], t))
            out[name], row = torch.cat(parts), row + 3
        else:
            out[name], row = base + torch.einsum("k,k...->...", coeffs[row], tau), row + 1
    assert row == coeffs.shape[0]
    return out


@pytest.mark.parametrize("which", ["open_clip", "mha"])
def test_equal_qkv_rows_reproduce_the_fused_row(which):
    module, tv, args = build(which)
    fused = MergedModel(module, tv, granularity="layerwise")
    split = MergedModel(module, tv, granularity="layerwise", split_qkv=True)
    n_fused = sum(is_fused(n) for n in tv.names)
    assert n_fused > 0
    assert split.coefficients.shape == (tv.num_params + 2 * n_fused, len(TASKS))
    random_coefficients(fused)
    with torch.no_grad():  # each row of the fused model copied to its one or three split rows
        split.coefficients.copy_(torch.cat([fused.coefficients[p].expand(3 if is_fused(n) else 1, -1)
                                            for p, n in enumerate(tv.names)]))
    a, b = fused.merged_parameters(), split.merged_parameters()
    for n in tv.names:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(features(split, args), features(fused, args), rtol=1e-5, atol=1e-5)
    # the state dict and the buffers reused by training merges agree too
    sd_a, sd_b = fused.merged_state_dict(), split.merged_state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        torch.testing.assert_close(sd_b[k], sd_a[k], rtol=1e-6, atol=1e-6, msg=k)
    reused = split.merged_parameters(reuse_buffers=True)
    for n in tv.names:
        torch.testing.assert_close(reused[n], b[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("which", ["open_clip", "mha"])
def test_each_qkv_row_merges_only_its_chunk(which):
    module, tv, _ = build(which)
    split = MergedModel(module, tv, granularity="layerwise", split_qkv=True)
    random_coefficients(split, seed=3)
    merged = {k: v.detach() for k, v in split.merged_parameters().items()}
    lam, params, row = split.coefficients.detach().double(), dict(module.named_parameters()), 0
    names = split.row_names()
    assert len(names) == split.coefficients.shape[0]
    for name, tau in zip(tv.names, tv.tensors):
        base, tau = params[name].detach().double(), tau.double()
        if is_fused(name):
            assert names[row:row + 3] == [f"{name}[q]", f"{name}[k]", f"{name}[v]"]
            d = base.shape[0] // 3
            for j in range(3):  # chunk j: base + sum_k lambda[row + j, k] tau_k, from its own row only
                s = slice(j * d, (j + 1) * d)
                want = base[s] + sum(lam[row + j, k] * tau[k, s] for k in range(len(TASKS)))
                torch.testing.assert_close(merged[name][s].double(), want, rtol=1e-6, atol=1e-6)
            # moving the k row changes the k chunk and nothing else
            with torch.no_grad():
                split.coefficients[row + 1] += 0.05
            moved = split.merged_parameters()[name].detach()
            with torch.no_grad():
                split.coefficients[row + 1] -= 0.05
            assert torch.equal(moved[:d], merged[name][:d]) and torch.equal(moved[2 * d:], merged[name][2 * d:])
            assert not torch.allclose(moved[d:2 * d], merged[name][d:2 * d])
            row += 3
        else:
            assert names[row] == name
            want = base + sum(lam[row, k] * tau[k] for k in range(len(TASKS)))
            torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-6)
            row += 1
    table = split.coefficient_table()
    assert list(table) == list(TASKS) and all(len(v) == len(names) for v in table.values())


@pytest.mark.parametrize("which", ["open_clip", "mha"])
def test_qkv_row_gradients_are_chunk_inner_products(which):
    module, tv, args = build(which)
    split = MergedModel(module, tv, granularity="layerwise", split_qkv=True)
    random_coefficients(split, seed=5)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        w = torch.randn(features(split, args).shape, generator=g)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return (w * out).sum() + 0.5 * (out ** 2).sum()

    loss_of(features(split, args)).backward()
    fast = split.coefficients.grad.clone()
    # autograd through the naive per-chunk formula
    coeffs = split.coefficients.detach().clone().requires_grad_(True)
    naive = naive_params(module, tv, coeffs)
    loss_of(features(split, args, params=naive)).backward()
    torch.testing.assert_close(fast, coeffs.grad, rtol=1e-4, atol=1e-5)
    # and by definition: <d loss / d theta chunk, tau_k chunk>
    theta = {k: v.detach().requires_grad_(True) for k, v in naive.items()}
    loss_of(features(split, args, params=theta)).backward()
    row = 0
    for name, tau in zip(tv.names, tv.tensors):
        grad = theta[name].grad.double()
        chunks = zip(grad.chunk(3), tau.double().chunk(3, dim=1)) if is_fused(name) else [(grad, tau.double())]
        for j, (gc, tc) in enumerate(chunks):
            want = torch.stack([(gc * tc[k]).sum() for k in range(len(TASKS))])
            torch.testing.assert_close(fast[row + j].double(), want, rtol=1e-4, atol=1e-5, msg=f"{name} {j}")
        row += 3 if is_fused(name) else 1


def test_split_qkv_checks_its_settings():
    module, tv, _ = build("open_clip")
    with pytest.raises(ValueError, match="needs granularity 'layerwise'"):
        MergedModel(module, tv, granularity="taskwise", split_qkv=True)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"none of the 4 merged parameters \(0.weight, 0.bias, 1.weight, 1.bias\) "
                                         r"is a fused q/k/v"):
        MergedModel(plain, task_vectors_of(plain), split_qkv=True)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 7)
    odd = Odd()
    with pytest.raises(ValueError, match=r"'qkv.weight' has shape \(7, 4\)"):
        MergedModel(odd, task_vectors_of(odd), split_qkv=True)
    with pytest.raises(ValueError, match="model.split_qkv .* needs model.granularity: layerwise"):
        AdaMerging(RandomPool(), granularity="taskwise", split_qkv=True)
    # the default is the single row per tensor, the names as before
    fused = MergedModel(module, tv)
    assert fused.coefficients.shape == (tv.num_params, len(TASKS)) and fused.row_names() == tv.names


def test_fit_resume_and_load_with_split_qkv(tmp_path):
    dm = lambda: MultiTaskDataModule(random_data(), batch_size=4, seed=3)  # noqa: E731
    full = AdaMerging(RandomPool(), lr=0.05, split_qkv=True)
    names = full.merged.task_vectors.names
    rows = full.merged.row_names()  # TinyViT's fused qkv nn.Linear: blocks.0.qkv.weight / .bias
    assert [r for r in rows if "qkv" in r] == [f"blocks.0.qkv.{w}[{c}]" for w in ("weight", "bias") for c in "qkv"]
    shape = (len(names) + 4, 3)
    assert full.learned_shapes() == {COEFFICIENTS_KEY: shape}
    trainer(tmp_path / "full", 12).fit(full, dm())
    lam = full.merged.coefficients.detach()
    q, k, v = (rows.index(f"blocks.0.qkv.weight[{c}]") for c in "qkv")
    assert not (torch.equal(lam[q], lam[k]) and torch.equal(lam[k], lam[v]))  # the three rows learn apart

    part = AdaMerging(RandomPool(), lr=0.05, split_qkv=True)
    trainer(tmp_path / "part", 6, [RunCheckpoint(every_n_train_steps=3, save_last=True)]).fit(part, dm())
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert tuple(read_checkpoint(last)["state_dict"][COEFFICIENTS_KEY].shape) == shape
    resumed = AdaMerging(RandomPool(), lr=0.05, split_qkv=True)
    t = trainer(tmp_path / "part", 12, [RunCheckpoint(every_n_train_steps=3, save_last=True)])
    t.fit(resumed, dm(), ckpt_path="last")
    assert t.global_step == 12
    torch.testing.assert_close(resumed.merged.coefficients, full.merged.coefficients, rtol=0, atol=1e-6)

    # a run without the option refuses the checkpoint (and the other way round), by shape
    with pytest.raises(ValueError, match=rf"layerwise coefficients with split q/k/v rows of shape \({shape[0]}, 3\), "
                                         rf"this run expects \({len(names)}, 3\): use the same granularity and model.split_qkv"):
        trainer(tmp_path / "part", 14).fit(AdaMerging(RandomPool(), lr=0.05), dm(), ckpt_path="last")
    plain = AdaMerging(RandomPool())
    trainer(tmp_path / "plain", 1, [RunCheckpoint(every_n_train_steps=1, save_last=True)]).fit(plain, dm())
    with pytest.raises(ValueError, match=rf"this run expects \({shape[0]}, 3\)"):
        AdaMerging(RandomPool(), split_qkv=True).load_coefficients(
            str(tmp_path / "plain" / "checkpoints" / "last.ckpt"))

    # load_coefficients (last.ckpt is now the resumed run's, step 12): the same merged model
    loaded = AdaMerging(RandomPool(), split_qkv=True)
    loaded.load_coefficients(str(last))
    # the export's coefficient table names each row, q/k/v rows included
    from adamerge.io.export import export
    table = json.loads(export(AdaMerging(RandomPool(), split_qkv=True), last, tmp_path / "x")["coefficients"].read_text())
    assert table["parameters"] == rows and all(len(v) == len(rows) for v in table["coefficients"].values())
    assert torch.equal(loaded.merged.coefficients, resumed.merged.coefficients)
    sd, want = loaded.merged.merged_state_dict(), resumed.merged.merged_state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)
    lam = loaded.merged.lambdas().detach()
    base = dict(loaded.merged.module.named_parameters())["blocks.0.qkv.weight"].detach()
    tau = loaded.merged.task_vectors.tensors[names.index("blocks.0.qkv.weight")]
    d = base.shape[0] // 3
    for j, r in enumerate((q, k, v)):
        s = slice(j * d, (j + 1) * d)
        torch.testing.assert_close(sd["blocks.0.qkv.weight"][s], base[s] + torch.einsum("k,k...->...", lam[r], tau[:, s]))
