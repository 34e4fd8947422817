"""Representation Surgery and Model Tinting on the shared engine: start exactly at the merged
model, learn, cache the experts' features, checkpoint only the learned tensors, refuse a
checkpoint of another method, export the per-task parts, run in compare."""

from __future__ import annotations

import dataclasses
import json
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
from torch.func import functional_call

from adamerge import AdaMerging, MultiTaskDataModule, Surgery, Tinting
from adamerge.compare import CompareSettings, compare
from adamerge.engine.objectives import confident_pseudo_label
from adamerge.exported import ExportedModel
from adamerge.io.checkpoints import load_state_dict, read_checkpoint
from adamerge.io.export import export
from adamerge.methods.adamerging import COEFFICIENTS_KEY
from adamerge.models.clip import ZeroShotHead
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource, TinyViT
from test_adamerging import random_data, trainer
from conftest import RandomPool

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> PreloadedPool:
    return PreloadedPool(SuitePool("tiny").load())


def batch_of(dm: MultiTaskDataModule, step: int = 0) -> dict:
    dm.select_tasks(SuiteSource("tiny").task_names())
    return next(iter(dm.train_dataloader()))


def test_surgery_starts_exactly_at_the_merged_model():
    pool = tiny()
    surgery = Surgery(pool, granularity="taskwise", prior=0.3)
    plain = AdaMerging(pool, granularity="taskwise", prior=0.3, learn_coefficients=False)
    assert all(torch.count_nonzero(m.up.weight) == 0 for m in surgery.task_modules.values())
    x = torch.stack([SuiteSource("tiny").dataset("digits", "test")[i][0] for i in range(32)])
    params = plain.merged.merged_parameters()
    with torch.no_grad():
        for t in surgery.task_names:
            assert torch.equal(surgery.task_logits({t: x}, params)[t], plain.task_logits({t: x}, params)[t])


def test_tinting_starts_at_the_zero_shot_heads_and_its_loss_keeps_trusted_images():
    pool = tiny()
    tint, plain = Tinting(pool), AdaMerging(pool)
    x = torch.stack([SuiteSource("tiny").dataset("shapes", "test")[i][0] for i in range(16)])
    with torch.no_grad():
        params = plain.merged.merged_parameters()
        assert torch.allclose(tint.task_logits({"shapes": x}, params)["shapes"],
                              plain.task_logits({"shapes": x}, params)["shapes"], atol=1e-5)
    # merged / expert: 0 agree, 1 disagree with a more confident expert, 2 disagree with a less
    # confident expert (dropped)
    merged = torch.tensor([[2.0, 0.0], [1.0, 0.0], [5.0, 0.0]], requires_grad=True)
    expert = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 1.0]])
    loss = confident_pseudo_label(merged, expert)
    assert loss.item() == pytest.approx(F.cross_entropy(merged[:2], torch.tensor([0, 1])).item())
    loss.backward()
    assert torch.count_nonzero(merged.grad[2]) == 0 and torch.count_nonzero(merged.grad[1]) == 2
    none = confident_pseudo_label(torch.tensor([[5.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0]]))
    assert none.item() == 0.0 and none.requires_grad


def test_expert_features_are_computed_once_per_image_and_match_the_expert(tmp_path):
    pool = tiny()
    model = Surgery(pool, expert_chunk=16)
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16)
    trainer(tmp_path, 40).fit(model, dm)
    experts = model.experts
    sizes = {t: len(dm.dataset(t, "test")) for t in model.task_names}
    assert experts.images_served == 40 * 16 * 3
    assert experts.images_computed <= sum(sizes.values())  # never an image twice
    loaded = pool.load()
    k, t = 1, model.task_names[1]
    idx = torch.tensor([5, 0, 77])
    x = torch.stack([dm.dataset(t, "test")[int(i)][0] for i in idx])
    expert = {n: p + loaded.task_vectors.tensors[j][k] for j, (n, p) in
              enumerate((n, dict(loaded.encoder.named_parameters())[n]) for n in loaded.task_vectors.names)}
    with torch.no_grad():
        want = functional_call(loaded.encoder, expert, (x,), strict=False)
    assert torch.allclose(experts(t, idx), want, atol=1e-6)


@pytest.mark.parametrize("cls,key", [(Surgery, "train/l1"), (Tinting, "train/pseudo_ce")])
def test_objective_decreases_on_the_tiny_pool(tmp_path, cls, key):
    seen = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics[key]))
    model = cls(tiny(), lr=1e-2)
    trainer(tmp_path, 40, [Rec()]).fit(model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    first, last = sum(seen[:5]) / 5, sum(seen[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_surgery_on_a_learned_merge_keeps_its_coefficients_and_checkpoints_adapters(tmp_path):
    pool = RandomPool()
    dm = MultiTaskDataModule(random_data(), batch_size=8)
    ada = AdaMerging(pool, granularity="layerwise", lr=5e-2)
    tr = trainer(tmp_path / "ada", 5)
    tr.fit(ada, dm)
    tr.save_checkpoint(tmp_path / "ada.ckpt")
    surgery = Surgery(pool, granularity="layerwise", init_from=str(tmp_path / "ada.ckpt"))
    assert torch.equal(surgery.merged.coefficients, ada.merged.coefficients)
    tr = trainer(tmp_path / "s", 5)
    tr.fit(surgery, MultiTaskDataModule(random_data(), batch_size=8))
    assert torch.equal(surgery.merged.coefficients, ada.merged.coefficients)  # fixed
    assert all(torch.count_nonzero(m.up.weight) > 0 for m in surgery.task_modules.values())
    tr.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = read_checkpoint(tmp_path / "s.ckpt")
    assert ckpt["adamerge"]["method"] == "surgery"
    assert set(ckpt["state_dict"]) == {COEFFICIENTS_KEY} | {f"task_modules.{t}.{p}.weight" for t in "abc"
                                                            for p in ("down", "up")}
    # the same files give the same model; a checkpoint of one method is refused by another
    again = Surgery(pool, granularity="layerwise")
    again.load_coefficients(tmp_path / "s.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(again.learned_state().values(), surgery.learned_state().values()))
    with pytest.raises(ValueError, match=r"written by method 'surgery', this run is 'adamerging'") as e:
        AdaMerging(pool, granularity="layerwise").load_coefficients(tmp_path / "s.ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"written by method 'adamerging', this run is 'tinting'.*init_from"):
        Tinting(pool).load_coefficients(tmp_path / "ada.ckpt")
    with pytest.raises(ValueError, match=r"written by method 'surgery', this run is 'tinting'"):
        trainer(tmp_path / "t", 6).fit(Tinting(pool), MultiTaskDataModule(random_data(), batch_size=8),
                                       ckpt_path=tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match=r"'task_modules.a.down.weight' of shape \(16, 16\), this run expects \(4, 16\)"):
        Surgery(pool, granularity="layerwise", rank=4).load_coefficients(tmp_path / "s.ckpt")
    with pytest.raises(ValueError, match="taskwise.*granularity|layerwise coefficients"):
        Surgery(pool, granularity="taskwise", init_from=str(tmp_path / "ada.ckpt"))


def test_export_writes_adapters_and_tinted_heads_that_plain_torch_can_apply(tmp_path):
    pool = RandomPool()
    data = random_data()
    for cls in (Surgery, Tinting):
        model = cls(pool, lr=5e-2)
        tr = trainer(tmp_path / cls.__name__, 4)
        tr.fit(model, MultiTaskDataModule(data, batch_size=8))
        tr.save_checkpoint(tmp_path / f"{cls.__name__}.ckpt")
        fresh = cls(pool)
        paths = export(fresh, tmp_path / f"{cls.__name__}.ckpt", tmp_path / f"out_{cls.__name__}")
        merged, heads = load_state_dict(paths["merged"]), load_state_dict(paths["heads"])
        enc = pool.load().encoder
        enc.load_state_dict(merged)
        x = data.dataset("b", "test")[:6][0]
        with torch.no_grad():
            f = enc(x)
            if cls is Surgery:
                mods = load_state_dict(paths["task_modules"])
                f = f - torch.relu(f @ mods["b.down"].T) @ mods["b.up"].T
            logits = f @ heads["b.weight"].T + (heads["b.bias"] if "b.bias" in heads else 0)
            want = model.task_logits({"b": x}, model.merged.merged_parameters())["b"]
        assert torch.allclose(logits, want, atol=1e-5), cls
        assert ("task_modules" in paths) == (cls is Surgery)


def test_compare_runs_adamerging_first_for_surgery_on_its_coefficients(tmp_path):
    loaded = SuitePool("tiny").load()
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16, eval_batch_size=256)
    res = compare(loaded, dm, tmp_path, CompareSettings(steps=6, val_split=None),
                  methods=["adamerging_layerwise_surgery"], suite="tiny", say=lambda s: None)
    assert list(res["methods"]) == ["adamerging_layerwise", "adamerging_layerwise_surgery"]
    used = res["hparams"]["adamerging_layerwise_surgery"]["init_from"]
    first = read_checkpoint(used)["state_dict"][COEFFICIENTS_KEY]
    after = read_checkpoint(tmp_path / "runs/adamerging_layerwise_surgery/final.ckpt")["state_dict"]
    assert torch.equal(after[COEFFICIENTS_KEY], first)
    assert (tmp_path / "coefficients_adamerging_layerwise_surgery.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["methods"].keys() == res["methods"].keys()


def fit_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adamerge", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
            "--seed_everything", "7", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", *extra]


@pytest.mark.parametrize("method", ["Surgery", "Tinting"])
def test_sigkill_mid_run_then_resume_gives_identical_learned_tensors_and_exports(tmp_path, method):
    SuitePool("tiny").load()  # build the cached suite once, not in two processes at a time
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    extra = ["--model.class_path", f"adamerge.methods.{method}", "--trainer.max_steps", "60"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(fit_command(full, *extra), cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(fit_command(killed, *extra), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    periodic = killed / "checkpoints/epoch=0-step=10.ckpt"
    deadline = time.monotonic() + 300
    while not periodic.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    at_kill = read_checkpoint(killed / "checkpoints/last.ckpt")["global_step"]
    assert 5 <= at_kill < 60, at_kill
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    proc = subprocess.run(fit_command(killed, *extra, "--ckpt_path", "last"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = read_checkpoint(full / "checkpoints/last.ckpt")
    b = read_checkpoint(killed / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 60 and b["adamerge"]["method"] == method.lower()
    assert set(a["state_dict"]) == set(b["state_dict"]) and len(a["state_dict"]) > 1
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (key, at_kill)
    if method != "Surgery":
        return
    # export from the command line: the config + class_path rebuild the module, adapters come out
    proc = subprocess.run([sys.executable, "-m", "adamerge", "export", "--config", str(ROOT / "configs/tiny.yaml"),
                           "--model.class_path", "adamerge.methods.Surgery", "--ckpt_path",
                           str(killed / "checkpoints/last.ckpt"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mods = load_state_dict(tmp_path / "out/task_modules.safetensors")
    assert set(mods) == {f"{t}.{p}" for t in SuiteSource("tiny").task_names() for p in ("down", "up")}
    assert torch.equal(mods["digits.up"], b["state_dict"]["task_modules.digits.up.weight"])


def test_compare_rows_do_not_depend_on_the_global_random_state(tmp_path):
    loaded = SuitePool("tiny").load()
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # as if other rows had consumed random numbers before
        dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16, eval_batch_size=256)
        compare(loaded, dm, tmp_path / str(seed), CompareSettings(steps=2, val_split=None),
                methods=["task_arithmetic_surgery"], suite="tiny", say=lambda s: None)
        adapters.append(read_checkpoint(tmp_path / str(seed) / "runs/task_arithmetic_surgery/final.ckpt")["state_dict"])
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_pseudo_label_objective_gradient_matches_finite_differences_and_filters_by_confidence():
    from adamerge.engine.objectives import expert_pseudo_label
    merged = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    expert = torch.tensor([[0.0, 5.0], [0.0, 0.1]])  # confident 1, unsure (p=0.52) 1
    assert expert_pseudo_label(merged, expert).item() == pytest.approx(
        F.cross_entropy(merged, torch.tensor([1, 1])).item())
    assert expert_pseudo_label(merged, expert, 0.9).item() == pytest.approx(
        F.cross_entropy(merged[:1], torch.tensor([1])).item())
    assert expert_pseudo_label(merged, expert, 0.999).item() == 0.0

    model = AdaMerging(tiny(), granularity="taskwise", objective="pseudo_label")
    data = SuiteSource("tiny")
    model.use_adaptation_data({t: data.dataset(t, "test") for t in model.task_names})
    images = {t: torch.stack([data.dataset(t, "test")[i][0] for i in range(16)]) for t in model.task_names}
    indices = {t: torch.arange(16) for t in model.task_names}
    expert_logits = {t: model.heads[t](model.experts(t, indices[t])) for t in model.task_names}
    assert any(len(set(z.argmax(-1).tolist())) > 1 for z in expert_logits.values())

    def loss_at(coeffs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            model.merged.coefficients.copy_(coeffs)
        losses = model.task_losses(images, indices, model.merged.merged_parameters())
        return torch.stack(list(losses.values())).sum()
    c0 = torch.tensor([[0.3, 0.5, 0.4]])
    loss_at(c0).backward()
    grad = model.merged.coefficients.grad.clone()
    eps = 1e-2
    numeric = torch.zeros_like(c0)
    for k in range(3):
        d = torch.zeros_like(c0)
        d[0, k] = eps
        numeric[0, k] = (loss_at(c0 + d).item() - loss_at(c0 - d).item()) / (2 * eps)
    assert torch.allclose(grad, numeric, rtol=0.05, atol=1e-4), (grad, numeric)


def test_pseudo_label_row_learns_on_the_tiny_pool(tmp_path):
    seen = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/pseudo_ce"]))
    from adamerge.methods import registry
    hp = registry.get("adamerging_layerwise_pseudolabel").resolve({"lr": 1e-2})
    model = AdaMerging(tiny(), **hp)
    trainer(tmp_path, 40, [Rec()]).fit(model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    assert sum(seen[-5:]) / 5 < 0.9 * sum(seen[:5]) / 5, seen


# ---------------------------------------------------------------- feature_norm: fusionbench
class RawViT(TinyViT):
    """The test TinyViT with an output that is not L2-normalised (a norm of 1 to 5 per image, as
    CLIP's image embedding is not): what the encoder gives decides what ``feature_norm`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (1.0 + 4.0 * x.flatten(1).mean(1, keepdim=True))


def raw_clip_like_pool(unseen: bool = False) -> PreloadedPool:
    """:class:`RandomPool` on :class:`RawViT` with zero-shot heads (which normalise their input);
    ``unseen``: one more task ``u`` evaluated only."""
    loaded = RandomPool().load()
    enc = RawViT(image_size=8, patch=4, dim=16, depth=1, heads=2, out_dim=16)
    enc.load_state_dict(loaded.encoder.state_dict())
    heads = {t: ZeroShotHead(h.weight.detach()) for t, h in loaded.heads.items()}
    extra = {"u": ZeroShotHead(10 * torch.randn(5, 16, generator=torch.Generator().manual_seed(3)))} if unseen else {}
    return PreloadedPool(dataclasses.replace(loaded, encoder=enc, heads=heads, unseen_heads=extra))


def randomize_up(model: Surgery, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.task_modules.values():
            m.up.weight.copy_(0.3 * torch.randn(m.up.weight.shape, generator=g))


def test_surgery_fusionbench_feature_norm_feeds_the_heads_normalised_features_not_renormalised():
    pool = raw_clip_like_pool()
    fb, plain = Surgery(pool, feature_norm="fusionbench"), Surgery(pool)
    x = random_data().dataset("a", "test")[:8][0]
    params = fb.merged.merged_parameters()
    with torch.no_grad():
        f = functional_call(fb.merged.module, params, (x,), strict=False)
        assert not torch.allclose(f.norm(dim=-1), torch.ones(8))  # the encoder's output is raw
        n = F.normalize(f, dim=-1)
        for t in fb.task_names:  # up zero: the adapter gives the merged model's normalised features
            assert torch.allclose(fb.task_modules[t](f), n, atol=1e-6)
            assert torch.allclose(plain.task_modules[t](f), f, atol=1e-6)
            # and the zero-shot head sees them as they are (its normalisation is a no-op here)
            assert torch.allclose(fb.task_logits({t: x}, params)[t], plain.task_logits({t: x}, params)[t], atol=1e-5)
        randomize_up(fb)
        for t in fb.task_names:  # trained adapters: logit_scale * text @ (n - up(relu(down n))), no renormalising
            a = fb.task_modules[t]
            s = n - torch.relu(n @ a.down.weight.T) @ a.up.weight.T
            w = fb.heads[t].linear.weight
            got = fb.task_logits({t: x}, params)[t]
            assert torch.allclose(got, s @ w.T, atol=1e-5)
            assert not torch.allclose(got, F.normalize(s, dim=-1) @ w.T, atol=1e-3)


def test_surgery_fusionbench_l1_loss_is_between_normalised_merged_and_expert_features():
    pool = raw_clip_like_pool()
    loaded = pool.load()
    data = random_data()
    model = Surgery(pool, feature_norm="fusionbench")
    randomize_up(model, seed=1)
    model.use_adaptation_data({t: data.dataset(t, "test") for t in model.task_names})
    idx = torch.tensor([3, 0, 11, 7])
    images = {t: data.dataset(t, "test")[idx][0] for t in model.task_names}
    indices = {t: idx for t in model.task_names}
    params = model.merged.merged_parameters()
    with torch.no_grad():
        losses = model.task_losses(images, indices, params)
        base = dict(loaded.encoder.named_parameters())
        for k, t in enumerate(model.task_names):
            expert = {n: base[n] + loaded.task_vectors.tensors[j][k] for j, n in enumerate(loaded.task_vectors.names)}
            e = F.normalize(functional_call(loaded.encoder, expert, (images[t],), strict=False), dim=-1)
            m = F.normalize(functional_call(loaded.encoder, params, (images[t],), strict=False), dim=-1)
            a = model.task_modules[t]
            want = (m - torch.relu(m @ a.down.weight.T) @ a.up.weight.T - e).abs().mean()
            assert losses[t].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7), t
            raw = (functional_call(loaded.encoder, expert, (images[t],), strict=False) - a(m)).abs().mean()
            assert abs(losses[t].item() - raw.item()) > 1e-3  # the expert side is normalised too


def test_surgery_feature_norm_rejects_an_unknown_value_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.feature_norm must be one of none, fusionbench, got 'l2'"):
        Surgery(RandomPool(), feature_norm="l2")


def test_surgery_fusionbench_export_gives_the_module_logits_and_checkpoints_only_weights(tmp_path):
    pool = raw_clip_like_pool(unseen=True)
    model = Surgery(pool, feature_norm="fusionbench", lr=5e-2)
    tr = trainer(tmp_path, 4)
    tr.fit(model, MultiTaskDataModule(random_data(("a", "b", "c", "u")), batch_size=8))
    tr.save_checkpoint(tmp_path / "s.ckpt")
    assert set(read_checkpoint(tmp_path / "s.ckpt")["state_dict"]) == {COEFFICIENTS_KEY} | {
        f"task_modules.{t}.{p}.weight" for t in "abc" for p in ("down", "up")}
    paths = export(Surgery(pool, feature_norm="fusionbench"), tmp_path / "s.ckpt", tmp_path / "out")
    assert load_state_dict(paths["task_modules"])["a.normalize_input"].item() == 1
    enc = RawViT(image_size=8, patch=4, dim=16, depth=1, heads=2, out_dim=16)
    exported = ExportedModel.from_folder(tmp_path / "out", encoder=enc)
    x = random_data().dataset("b", "test")[:6][0]
    params = model.merged.merged_parameters()
    with torch.no_grad():
        for t in ("a", "b", "c", "u"):  # adapted tasks and the unseen one (its head normalises)
            want = model.task_logits({t: x}, params)[t]
            assert torch.allclose(exported(x, t), want, atol=1e-5), t
