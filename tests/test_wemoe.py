"""WEMoE: routed MLP task vectors on the shared engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.engine.merged_model import MergedModel
from adamerge.engine.task_vectors import TaskVectors
from adamerge.io.checkpoints import read_checkpoint
from adamerge.io.export import export
from adamerge.methods.adamerging import COEFFICIENTS_KEY
from adamerge.methods.wemoe import RoutedLinearFunction, WEMoE, load_wemoe
from adamerge.models.layout import find_mlps
from adamerge.models.pool import LoadedPool, PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> PreloadedPool:
    return PreloadedPool(SuitePool("tiny").load())


def tiny_images(n: int = 6) -> torch.Tensor:
    ds = SuiteSource("tiny").dataset("digits", "test")
    return torch.stack([ds[i][0] for i in range(n)])


def constant_routers(model: WEMoE, value: float) -> None:
    """Routers whose output is ``value`` for every task, whatever the input."""
    with torch.no_grad():
        for router in model.routers:
            for layer in router.net:
                if isinstance(layer, nn.Linear):
                    layer.weight.zero_()
            router.net[-1].bias.fill_(value)


def test_routers_giving_the_task_arithmetic_weights_reproduce_task_arithmetic():
    loaded = SuitePool("tiny").load()
    model = WEMoE(PreloadedPool(loaded), scaling=0.3)
    constant_routers(model, 0.3)
    x = tiny_images()
    got = model.merged(x, params=model.merged.merged_parameters())
    ta = MergedModel(loaded.encoder, loaded.task_vectors, granularity="taskwise", prior=0.3)
    assert (got - ta(x)).abs().max().item() <= 1e-5
    # the pool's encoder is not changed: other methods on the same load see plain linear layers
    assert all(isinstance(m, nn.Linear) for n, m in loaded.encoder.named_modules() if n.endswith(("fc1", "fc2")))
    # and outside the MLPs the merge is task arithmetic, inside it the pretrained weights
    lam = model.merged.lambdas()
    rows = {n: i for i, n in enumerate(loaded.task_vectors.names)}
    assert torch.all(lam[rows["blocks.0.fc1.weight"]] == 0) and torch.all(lam[rows["blocks.0.qkv.weight"]] == 0.3)


def test_routed_linear_matches_a_per_sample_loop_and_its_gradients_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 6, generator=g, dtype=torch.double, requires_grad=True)
    r = torch.randn(5, 3, generator=g, dtype=torch.double, requires_grad=True)
    w, b = torch.randn(7, 6, generator=g, dtype=torch.double), torch.randn(7, generator=g, dtype=torch.double)
    tau, tb = torch.randn(3, 7, 6, generator=g, dtype=torch.double), torch.randn(3, 7, generator=g, dtype=torch.double)
    loop = torch.stack([F.linear(x[i], w + torch.einsum("k,khd->hd", r[i], tau), b + r[i] @ tb)
                        for i in range(5)])
    for chunk in (1, 3, 7):
        y = RoutedLinearFunction.apply(x, r, w, b, tau, tb, chunk)
        assert torch.allclose(y, loop, atol=1e-12)
    # task vectors stored in a narrower dtype than the base (task_vector_dtype): the same mixture
    y = RoutedLinearFunction.apply(x, r, w, b, tau.float(), tb.float(), 3)
    assert torch.allclose(y, loop, atol=1e-5 * loop.abs().max().item())
    assert torch.autograd.gradcheck(lambda a, c: RoutedLinearFunction.apply(a, c, w, b, tau, tb, 2), (x, r))
    assert torch.autograd.gradcheck(lambda a, c: RoutedLinearFunction.apply(a, c, w, None, tau, None, 3), (x, r))


def test_each_sample_is_routed_on_its_own_tokens():
    model = WEMoE(tiny())
    x = tiny_images(4)
    params = model.merged.merged_parameters()
    together = model.merged(x, params=params)
    alone = torch.cat([model.merged(x[i:i + 1], params=params) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6)
    routing = model.merged.module.blocks[0].fc1.routing
    model.merged(x, params=params)
    assert routing.weights.shape == (4, 3) and not torch.allclose(routing.weights[0], routing.weights[1])


def test_batch_reduce_routes_each_task_batch_by_its_average_in_adaptation_steps_only():
    torch.manual_seed(0)
    model = WEMoE(tiny(), batch_reduce=True)
    with torch.no_grad():  # routers that tell samples apart
        for router in model.routers:
            router.net[0].weight.normal_(0, 0.5)
    x = tiny_images(6)
    params = model.merged.merged_parameters()
    routing = model.merged.module.blocks[0].fc1.routing
    model._adapting = True  # as inside adaptation_step: two task batches of 3 (one call) ...
    feats = model.features({"a": x[:3], "b": x[3:]}, params)
    assert routing.weights.shape == (2, 3)
    # ... equals each task batch run alone, with its own average routing vector
    alone = [model.features({"a": x[:3]}, params)["a"], model.features({"b": x[3:]}, params)["b"]]
    assert torch.allclose(feats["a"], alone[0], atol=1e-6) and torch.allclose(feats["b"], alone[1], atol=1e-6)
    assert not torch.allclose(feats["a"], model.merged(x[:3], params=params), atol=1e-4)  # not per sample
    # unequal task batches: one call per group, the same features
    uneven = model.features({"a": x[:2], "b": x[2:]}, params)
    assert torch.allclose(uneven["a"], model.features({"a": x[:2]}, params)["a"], atol=1e-6)
    assert torch.allclose(uneven["b"], model.features({"b": x[2:]}, params)["b"], atol=1e-6)
    # a batch of one image: the per-sample routing
    assert torch.allclose(model.features({"a": x[:1]}, params)["a"], model.merged(x[:1], params=params), atol=1e-6)
    model._adapting = False  # evaluation, prediction: per sample, as FusionBench's returned model
    assert torch.allclose(model.features({"a": x[:3]}, params)["a"], model.merged(x[:3], params=params), atol=0)
    assert routing.groups is None


def test_batch_reduce_trains_and_its_gradients_reach_the_routers():
    torch.manual_seed(0)
    model = WEMoE(tiny(), batch_reduce=True)
    images = {t: tiny_images(4) for t in model.task_names}
    batch = {t: (x, torch.arange(4)) for t, x in images.items()}
    loss = model.adaptation_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in model.routers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model.merged.module.blocks[0].fc1.routing.weights.shape == (len(model.task_names), 3)


def test_open_clip_mlps_are_found_and_routed():
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    enc = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
                            output_dim=32).eval()
    assert find_mlps(enc) == [(f"transformer.resblocks.{i}.mlp.c_fc", f"transformer.resblocks.{i}.mlp.c_proj")
                              for i in range(2)]
    base = {k: v.clone() for k, v in enc.state_dict().items()}
    experts = {t: {k: v + 0.02 * torch.randn_like(v) for k, v in base.items()} for t in ("a", "b")}
    names = [n for n, _ in enc.named_parameters()]
    tv = TaskVectors.from_state_dicts(base, experts, names=names)
    loaded = LoadedPool(enc, tv, {t: nn.Linear(32, 4) for t in ("a", "b")})
    model = WEMoE(PreloadedPool(loaded))
    constant_routers(model, 0.3)
    x = torch.randn(3, 3, 32, 32)
    ta = MergedModel(enc, tv, granularity="taskwise", prior=0.3)
    assert (model.merged(x) - ta(x)).abs().max().item() <= 1e-5


def test_training_lowers_entropy_and_checkpoints_only_the_routers(tmp_path):
    seen = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/entropy"]))
    torch.manual_seed(0)
    model = WEMoE(tiny(), lr=1e-2)
    tr = trainer(tmp_path, 30, [Rec()])
    tr.fit(model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    assert sum(seen[-5:]) / 5 < 0.95 * sum(seen[:5]) / 5, seen
    tr.save_checkpoint(tmp_path / "w.ckpt")
    ckpt = read_checkpoint(tmp_path / "w.ckpt")
    assert ckpt["adamerge"]["method"] == "wemoe"
    assert set(ckpt["state_dict"]) == {COEFFICIENTS_KEY} | {f"routers.{k}" for k in model.routers.state_dict()}
    other = WEMoE(tiny())
    other.load_coefficients(str(tmp_path / "w.ckpt"))
    x = tiny_images()
    assert torch.equal(other.merged(x), model.merged(x))
    with pytest.raises(ValueError, match="written by method 'wemoe'"):
        AdaMerging(tiny()).load_coefficients(str(tmp_path / "w.ckpt"))


def test_export_then_load_wemoe_rebuilds_the_model_on_a_fresh_encoder(tmp_path):
    torch.manual_seed(1)
    model = WEMoE(tiny())
    with torch.no_grad():  # routers that differ from their start, so the export must carry them
        for p in model.routers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "w.ckpt"
    torch.save({"state_dict": {k: v.detach().clone() for k, v in model.learned_state().items()},
                "adamerge": {"method": "wemoe", "fingerprint": model.fingerprint, "granularity": "layerwise"}},
               ckpt)
    paths = export(model, ckpt, tmp_path / "out")
    assert paths["wemoe"].name == "wemoe.safetensors"
    rebuilt = load_wemoe(_fresh_tiny_encoder(), tmp_path / "out")
    x = tiny_images()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.merged(x), atol=1e-6)


def _fresh_tiny_encoder() -> nn.Module:
    """A TinyViT of the tiny suite's shape with other (random) weights."""
    import copy
    enc = copy.deepcopy(SuitePool("tiny").load().encoder)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_()
    return enc


def fit_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adamerge", "fit", "--config", str(ROOT / "configs/tiny_wemoe.yaml"),
            "--seed_everything", "7", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", *extra]


def test_sigkill_mid_run_then_resume_gives_identical_routers(tmp_path):
    SuitePool("tiny").load()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(fit_command(full), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(fit_command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    periodic = killed / "checkpoints/epoch=0-step=10.ckpt"
    deadline = time.monotonic() + 300
    while not periodic.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    at_kill = read_checkpoint(killed / "checkpoints/last.ckpt")["global_step"]
    assert 5 <= at_kill < 60, at_kill
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    proc = subprocess.run(fit_command(killed, "--ckpt_path", "last"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = read_checkpoint(full / "checkpoints/last.ckpt")
    b = read_checkpoint(killed / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 60 and b["adamerge"]["method"] == "wemoe"
    assert any(k.startswith("routers.") for k in a["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (key, at_kill)


@pytest.mark.parametrize("cls", ["WEMoE", "TwinMerging"])
def test_pseudo_label_targets_are_the_experts_own_features(cls):
    """The expert feature cache of a method that routes inside its encoder (WEMoE, Twin-Merging)
    uses the pool's encoder: each expert is base + its own task vector, not the routed copy
    (on 00f7573 WEMoE's "experts" were base + tau_k + sum_j r_j tau_j, 0.1-0.4 off)."""
    from torch.func import functional_call
    import adamerge.methods as methods
    loaded = SuitePool("tiny").load()
    kwargs = {"objective": "pseudo_label"} if cls == "WEMoE" else {"objective": "entropy"}
    model = getattr(methods, cls)(PreloadedPool(loaded), **kwargs)
    model.needs_experts = True  # Twin's entropy objective reads no experts; the cache is shared code
    source = SuiteSource("tiny")
    datasets = {t: source.dataset(t, "test") for t in model.task_names}
    model.use_adaptation_data(datasets, chunk=8)
    idx = torch.arange(5)
    for t in model.task_names:
        x = torch.stack([datasets[t][int(i)][0] for i in idx])
        expert = {n: p.detach().clone() for n, p in loaded.encoder.named_parameters()}
        tv = loaded.task_vectors
        k = tv.task_names.index(t)
        for n, tau in zip(tv.names, tv.tensors):
            expert[n] = expert[n] + tau[k]
        with torch.no_grad():
            want = functional_call(loaded.encoder, expert, (x,), strict=False)
        torch.testing.assert_close(model.expert_features(t, idx, torch.device("cpu")), want,
                                   rtol=1e-5, atol=1e-6)
