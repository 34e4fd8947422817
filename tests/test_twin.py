"""Twin-Merging: shared task-arithmetic expert + per-input routed SVD-truncated exclusive parts."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from adamerge import AdaMerging, InMemorySource, MultiTaskDataModule
from adamerge.engine.merged_model import MergedModel
from adamerge.io.checkpoints import read_checkpoint
from adamerge.io.export import export
from adamerge.io.run_checkpoint import RunCheckpoint
from adamerge.methods.adamerging import COEFFICIENTS_KEY
from adamerge.methods.twin import TwinMerging, find_linears, load_twin
from adamerge.models.pool import PreloadedPool
from conftest import RandomPool, images
from test_adamerging import trainer

ROUTED = ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2", "proj"]


def pool():
    loaded = RandomPool().load()
    return loaded, PreloadedPool(loaded)


def force(model: TwinMerging, k: int) -> None:
    """A router whose softmax is one-hot on expert ``k`` whatever the input."""
    with torch.no_grad():
        model.router.out.weight.zero_()
        model.router.out.bias.zero_()
        model.router.out.bias[k] = 1e4
    model.router.eval()


def truncated(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


def reference(loaded, weights: torch.Tensor, scaling: float, fraction: float) -> dict[str, torch.Tensor]:
    """theta_s everywhere; theta_s + sum_k w_k trunc(theta_k - theta_s) on the routed layers."""
    tv = loaded.task_vectors
    base = dict(loaded.encoder.named_parameters())
    out = {}
    for n, tau in zip(tv.names, tv.tensors):
        shared = base[n] + scaling * tau.sum(0)
        out[n] = shared.detach().clone()
        if n.rpartition(".")[0] in ROUTED:
            for k in range(tau.shape[0]):
                delta = tau[k] - scaling * tau.sum(0)
                if n.endswith(".weight") and fraction < 1:
                    delta = truncated(delta, int(fraction * min(delta.shape)))
                out[n] += weights[k] * delta
    return out


def test_shared_expert_is_task_arithmetic_at_the_official_scaling():
    loaded, p = pool()
    model = TwinMerging(p)
    assert model.hparams.scaling == 0.29 and model.hparams.rank_fraction == 0.1
    params = model.merged.merged_parameters()
    base = dict(loaded.encoder.named_parameters())
    for n, tau in zip(loaded.task_vectors.names, loaded.task_vectors.tensors):
        torch.testing.assert_close(params[n], base[n] + 0.29 * tau.sum(0), rtol=0, atol=1e-6)
    x = images(6)
    ta = MergedModel(loaded.encoder, loaded.task_vectors, granularity="taskwise", prior=0.29)
    assert (model.shared_features({"a": x}, params)["a"] - ta(x)).abs().max() <= 1e-6
    # the pool's encoder is untouched: other methods on the same load see plain linear layers
    assert all(type(m) is nn.Linear for n, m in loaded.encoder.named_modules() if n in ROUTED)
    assert find_linears(loaded.encoder) == ROUTED and model.twin_layers == ROUTED


@pytest.mark.parametrize("path", ["hook", "features"])
def test_one_hot_router_gives_each_expert_exactly_at_full_rank(path):
    loaded, p = pool()
    model = TwinMerging(p, rank_fraction=1.0)
    assert set(model.twin_kinds.values()) == {"dense"}
    x = images(5, seed=3)
    params = model.merged.merged_parameters()
    for k, task in enumerate(model.task_names):
        force(model, k)
        with torch.no_grad():
            got = model.merged(x) if path == "hook" else model.features({task: x}, params)[task]
        want = functional_call(loaded.encoder, reference(loaded, torch.eye(3)[k], 0.29, 1.0), (x,))
        assert (got - want).abs().max() <= 1e-5, (task, (got - want).abs().max())
        # the expert on its routed layers, not the shared model
        assert (got - model.shared_features({task: x}, params)[task]).abs().max() > 1e-3


@pytest.mark.parametrize("storage", ["lowrank", "dense"])
def test_truncated_twin_vectors_mixed_per_sample_match_the_svd_reference(storage):
    loaded, p = pool()
    torch.manual_seed(0)
    model = TwinMerging(p, rank_fraction=0.5, storage=storage)
    assert set(model.twin_kinds.values()) == {storage}
    model.router.eval()
    with torch.no_grad():  # a router whose weights differ from image to image
        model.router.out.weight.mul_(30)
    source = distinct_tasks()
    x = torch.stack([source.dataset(t, "test").tensors[0][i] for t, i in (("a", 0), ("b", 0), ("c", 0), ("c", 1))])
    params = model.merged.merged_parameters()
    with torch.no_grad():
        w = torch.softmax(model.router(model.shared_features({"a": x}, params)["a"]), -1)
        together = model.merged(x)
    assert (w[0] - w[1]).abs().max() > 0.05, w
    for i in range(4):
        want = functional_call(loaded.encoder, reference(loaded, w[i], 0.29, 0.5), (x[i:i + 1],))
        assert (together[i:i + 1] - want).abs().max() <= 1e-5
    force(model, 1)  # one-hot at rank 50%: the truncated expert, not the expert itself
    with torch.no_grad():
        got = model.merged(x)
    expert = functional_call(loaded.encoder, reference(loaded, torch.eye(3)[1], 0.29, 1.0), (x,))
    assert (got - expert).abs().max() > 1e-4


def distinct_tasks(n: int = 24) -> InMemorySource:
    """Three tasks whose images differ in kind (dim noise, bright noise, stripes): a router can
    tell them apart. Splits ``train`` and ``test`` hold different images."""
    g = torch.Generator().manual_seed(0)
    stripes = (torch.arange(8) % 2).float().view(1, 1, 1, 8)

    def split(seed: int) -> dict[str, TensorDataset]:
        data = {"a": images(n, seed) * 0.3, "b": 0.7 + images(n, seed + 1) * 0.3,
                "c": stripes * 0.8 + images(n, seed + 2) * 0.2}
        return {t: TensorDataset(x, torch.randint(0, 5, (n,), generator=g)) for t, x in data.items()}
    test, train = split(1), split(11)
    return InMemorySource({t: {"test": test[t], "train": train[t]} for t in test})


class Losses(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(float(trainer.callback_metrics["train/task_ce"]))


def test_task_id_training_routes_images_to_their_task_and_checkpoints_the_router(tmp_path):
    source = distinct_tasks()
    model = TwinMerging(RandomPool(), lr=3e-2)
    losses = Losses()
    tr = trainer(tmp_path, 30, [losses])
    # the registry's data: a few labeled train images per class (only their task is read)
    tr.fit(model, MultiTaskDataModule(source, batch_size=8, shots=3, shots_split="train"))
    assert sum(losses.seen[-3:]) / 3 < 0.5 * sum(losses.seen[:3]) / 3, losses.seen
    for split in ("train", "test"):  # chance: 1/3
        assert model.router_accuracy({t: source.dataset(t, split).tensors[0] for t in "abc"}) >= 0.8, split
    path = tmp_path / "twin.ckpt"
    tr.save_checkpoint(path)
    ckpt = read_checkpoint(path)
    assert set(ckpt["state_dict"]) == {COEFFICIENTS_KEY} | {f"router.{k}" for k in model.router.state_dict()}
    assert any(k.endswith("running_mean") for k in ckpt["state_dict"])
    other = TwinMerging(RandomPool())
    other.load_coefficients(str(path))
    for k, v in model.learned_state().items():
        assert torch.equal(other.learned_state()[k], v), k
    model.router.eval(), other.router.eval()
    x = images(6)
    with torch.no_grad():
        assert torch.equal(other.merged(x), model.merged(x))
    with pytest.raises(ValueError, match="written by method 'twin_merging'"):
        AdaMerging(RandomPool()).load_coefficients(str(path))
    # adamerge compare's accuracies (the encoder routes itself) agree with the training path's logits
    datasets = {t: source.dataset(t, "test") for t in model.task_names}
    accs = model.accuracies(datasets)
    with torch.no_grad():
        logits = model.task_logits({t: ds.tensors[0] for t, ds in datasets.items()}, model.merged.merged_parameters())
    for t, ds in datasets.items():
        assert accs[t] == pytest.approx(100.0 * float((logits[t].argmax(-1) == ds.tensors[1]).float().mean()))


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_gives_the_same_router_as_an_uninterrupted_run(tmp_path):
    dm = lambda: MultiTaskDataModule(distinct_tasks(), batch_size=4, seed=3)
    full = TwinMerging(RandomPool(), lr=1e-2)
    trainer(tmp_path / "full", 8).fit(full, dm())
    part = TwinMerging(RandomPool(), lr=1e-2)
    trainer(tmp_path / "part", 8, [RunCheckpoint(every_n_train_steps=2, save_last=True), StopAt(4)]).fit(part, dm())
    assert read_checkpoint(tmp_path / "part/checkpoints/last.ckpt")["global_step"] == 4
    resumed = TwinMerging(RandomPool(), lr=1e-2)
    t = trainer(tmp_path / "part", 8, [RunCheckpoint(every_n_train_steps=2, save_last=True)])
    t.fit(resumed, dm(), ckpt_path="last")
    assert t.global_step == 8
    for k, v in full.learned_state().items():
        assert torch.equal(resumed.learned_state()[k], v), k
    assert not torch.equal(full.router.out.weight, part.router.out.weight)


def test_entropy_objective_trains_the_router_through_the_routed_layers():
    model = TwinMerging(RandomPool(), objective="entropy", storage="lowrank", rank_fraction=0.5)
    assert model.loss_name == "entropy"
    x = {t: images(4, seed=i) for i, t in enumerate(model.task_names)}
    params = model._train_params()
    loss = sum(model.task_losses(x, {t: None for t in x}, params).values())
    loss.backward()
    grads = [p.grad for p in model.router.parameters()]
    assert all(g is not None for g in grads) and model.router.out.weight.grad.abs().sum() > 0
    assert model.merged.coefficients.grad is None


def test_export_then_load_twin_rebuilds_the_routed_model(tmp_path):
    loaded, p = pool()
    torch.manual_seed(1)
    model = TwinMerging(p, rank_fraction=0.5)
    with torch.no_grad():
        for q in model.router.parameters():
            q.add_(0.1 * torch.randn_like(q))
    model.router.eval()
    ckpt = tmp_path / "t.ckpt"
    torch.save({"state_dict": {k: v.detach().clone() for k, v in model.learned_state().items()},
                "adamerge": {"method": "twin_merging", "fingerprint": model.fingerprint, "granularity": "taskwise"}},
               ckpt)
    paths = export(model, ckpt, tmp_path / "out")
    assert paths["twin"].name == "twin.safetensors"
    fresh = RandomPool(seed=9).load().encoder  # same shapes, other weights
    rebuilt = load_twin(fresh, tmp_path / "out")
    x = images(5)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.merged(x), atol=1e-6)
    # ExportedModel finds Twin-Merging's reader through the registry (on 00f7573 it loaded the
    # shared expert alone and answered without the router)
    from adamerge.exported import ExportedModel
    exported = ExportedModel.from_folder(tmp_path / "out", encoder=RandomPool(seed=9).load().encoder)
    params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
    with torch.no_grad():
        for task in model.task_names:
            torch.testing.assert_close(exported(x, task), model.task_logits({task: x}, params)[task],
                                       rtol=1e-5, atol=1e-5)


def test_open_clip_linear_layers_outside_attention_are_routed():
    from open_clip.transformer import VisionTransformer
    from adamerge.engine.task_vectors import TaskVectors
    from adamerge.models.pool import LoadedPool
    torch.manual_seed(0)
    enc = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                            output_dim=32).eval()
    mlps = [f"transformer.resblocks.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    assert find_linears(enc) == mlps  # attn.out_proj is read by nn.MultiheadAttention, never called
    base = {k: v.clone() for k, v in enc.state_dict().items()}
    experts = {t: {k: v + 0.02 * torch.randn_like(v) for k, v in base.items()} for t in ("a", "b")}
    tv = TaskVectors.from_state_dicts(base, experts, names=[n for n, _ in enc.named_parameters()])
    loaded = LoadedPool(enc, tv, {t: nn.Linear(32, 4) for t in ("a", "b")})
    model = TwinMerging(PreloadedPool(loaded), rank_fraction=1.0)
    force(model, 1)
    x = torch.randn(3, 3, 32, 32)
    params = {n: base[n] + 0.29 * t.sum(0) for n, t in zip(tv.names, tv.tensors)}
    for n, t in zip(tv.names, tv.tensors):
        if n.rpartition(".")[0] in mlps:
            params[n] = base[n] + t[1]
    with torch.no_grad():
        assert (model.merged(x) - functional_call(enc, params, (x,))).abs().max() <= 1e-5
