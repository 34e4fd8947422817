"""AdaRank: with every component kept it is the layer-wise merge; pruned components are removed
exactly; the straight-through gradient of a mask logit is the analytic one; the SVD is computed
once per pool and cached; training lowers the entropy, checkpoints hold coefficients and mask
logits only, resume and export work and another method's checkpoint is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.func import functional_call

from adamerge import AdaMerging, AdaRank, MultiTaskDataModule
from adamerge.engine.task_vectors import TaskVectors
from adamerge.io.checkpoints import load_state_dict, read_checkpoint
from adamerge.io.export import export
from adamerge.methods import registry
from adamerge.methods.adamerging import COEFFICIENTS_KEY
from adamerge.methods.adarank import MASK_LOGITS_KEY, masked_names, svd_cache_path, svd_subspaces
from adamerge.models.pool import LoadedPool, PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer

ROOT = Path(__file__).resolve().parents[1]
BLOCK_MATRICES = [f"blocks.{i}.{p}.weight" for i in range(2) for p in ("qkv", "proj", "fc1", "fc2")]


@pytest.fixture(scope="module")
def loaded() -> LoadedPool:
    return SuitePool("tiny").load()


def images(task: str = "digits", n: int = 16) -> torch.Tensor:
    data = SuiteSource("tiny").dataset(task, "test")
    return torch.stack([data[i][0] for i in range(n)])


def random_coefficients(model: AdaMerging, seed: int = 0) -> torch.Tensor:
    """Distinct coefficients per row and task (a uniform 0.3 would hide a row or task mix-up)."""
    g = torch.Generator().manual_seed(seed)
    coeffs = 0.1 + 0.6 * torch.rand(model.merged.coefficients.shape, generator=g)
    with torch.no_grad():
        model.merged.coefficients.copy_(coeffs)
    return coeffs


def test_masked_names_follow_the_official_choice_and_fall_back_to_block_matrices(loaded):
    tv = loaded.task_vectors
    assert masked_names(tv) == BLOCK_MATRICES  # no *attn*/*mlp* names: the blocks' 2-D weights
    assert masked_names(tv, "all_2d") == BLOCK_MATRICES + ["proj.weight"]
    block = "transformer.resblocks.0."
    clip = {block + "attn.in_proj_weight": (12, 4), block + "attn.in_proj_bias": (12,),
            block + "attn.out_proj.weight": (4, 4), block + "ln_1.weight": (4,),
            block + "mlp.c_fc.weight": (16, 4), block + "mlp.c_proj.weight": (4, 16),
            "positional_embedding": (5, 4), "proj": (4, 3), "conv1.weight": (4, 3, 2, 2)}
    clip_tv = TaskVectors(["a", "b"], list(clip), [torch.randn(2, *s) for s in clip.values()])
    assert masked_names(clip_tv) == [n for n in clip if n.endswith(("in_proj_weight", "out_proj.weight",
                                                                        "c_fc.weight", "c_proj.weight"))]
    with pytest.raises(ValueError, match="masked must be one of attn_mlp, all_2d, got 'mlp'"):
        masked_names(tv, "mlp")
    flat = TaskVectors(["a"], ["blocks.0.ln.weight"], [torch.randn(1, 4)])
    with pytest.raises(ValueError, match="masked='attn_mlp' selects no parameter"):
        masked_names(flat)
    with pytest.raises(ValueError, match="initial_rank_ratio must be in \\(0, 1\\], got 0"):
        AdaRank(PreloadedPool(loaded), initial_rank_ratio=0)


def test_every_component_kept_is_the_layerwise_merge(loaded, tmp_path):
    pool = PreloadedPool(loaded)
    rank = AdaRank(pool, cache_dir=tmp_path)
    plain = AdaMerging(pool, clamp=False, learn_coefficients=False)
    coeffs = random_coefficients(rank)
    with torch.no_grad():
        plain.merged.coefficients.copy_(coeffs)
        a, b = rank.merged.merged_parameters(), plain.merged.merged_parameters()
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in rank.merged.plain)
        assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-5
        x = images()
        assert float((rank.merged(x, params=a) - plain.merged(x, params=b)).abs().max()) <= 1e-5
    assert rank.merged.kept_fraction() == 1.0
    assert rank.merged.mask_table()["blocks.0.fc1.weight"] == {t: 32 for t in rank.task_names}


def test_pruned_components_are_removed_from_each_task_vector(loaded, tmp_path):
    rank = AdaRank(PreloadedPool(loaded), initial_rank_ratio=0.4, cache_dir=tmp_path)
    coeffs = random_coefficients(rank, seed=1)
    base = dict(loaded.encoder.named_parameters())
    with torch.no_grad():
        merged = rank.merged.merged_parameters()
    for p, (name, tau) in enumerate(zip(loaded.task_vectors.names, loaded.task_vectors.tensors)):
        if name not in BLOCK_MATRICES:
            want = base[name] + torch.einsum("k,k...->...", coeffs[p], tau)
            assert torch.allclose(merged[name], want, atol=1e-6), name
            continue
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        keep = int(s.shape[1] * 0.4)
        pruned = torch.einsum("kmr,kr,krn->kmn", u[:, :, keep:], s[:, keep:], vh[:, keep:])
        want = base[name].double() + torch.einsum("k,kmn->mn", coeffs[p].double(), tau.double() - pruned)
        assert float((merged[name].double() - want).abs().max()) <= 1e-5, name
        assert rank.merged.mask_table()[name] == {t: keep for t in rank.task_names}


def test_straight_through_gradient_of_a_mask_logit_is_the_analytic_one(loaded, tmp_path):
    rank = AdaRank(PreloadedPool(loaded), initial_rank_ratio=0.5, cache_dir=tmp_path)
    coeffs = random_coefficients(rank, seed=2)
    name = "blocks.1.fc1.weight"
    p = loaded.task_vectors.names.index(name)
    G = torch.randn(128, 32, generator=torch.Generator().manual_seed(3))
    (rank.merged.merged_parameters()[name] * G).sum().backward()  # d loss / d theta = G
    model = rank.merged
    grad = model.mask_logits.grad[:, model.offsets[name]: model.offsets[name] + model.ranks[name]]
    u, s, vh = torch.linalg.svd(loaded.task_vectors.tensors[p].double(), full_matrices=False)
    z = model.mask_logits.detach()[:, model.offsets[name]: model.offsets[name] + model.ranks[name]].double()
    sig = torch.sigmoid(z / 10.0)
    projection = torch.einsum("kmr,mn,krn->kr", u, G.double(), vh)  # u_kj^T G v_kj
    want = coeffs[p].double()[:, None] * s * projection * sig * (1 - sig) / 10.0
    # The module's factors come from a float32 SVD: each u_j, v_j may turn by theta_j (Wedin: about
    # c eps ||tau|| / gap_j), moving u_j^T G v_j by up to 2 theta_j ||G||: the tolerance follows
    # from the spectrum's gaps (near-equal singular values allow more), not from one machine.
    tau = loaded.task_vectors.tensors[p]
    gaps = torch.minimum(torch.cat([s[:, :1] * 2, s[:, :-1]], 1) - s, s - torch.cat([s[:, 1:], s[:, -1:] * 0], 1))
    theta = (16 * max(tau.shape[-2:]) ** 0.5 * torch.finfo(torch.float32).eps * s[:, :1] / gaps).clamp(max=2.0)
    slack = coeffs[p].double().abs()[:, None] * s * 2 * theta * torch.linalg.matrix_norm(G.double(), 2) \
        * sig * (1 - sig) / 10.0
    assert bool(((grad.double() - want).abs() <= slack + 1e-4 * want.abs() + 1e-6 * float(want.abs().max())).all())
    assert bool((grad[:, 16:] != 0).all())  # pruned components get a gradient too (straight-through)
    # the coefficient's gradient sees only the kept components: sum_j h_kj s_kj u^T G v
    kept = (z > 0).double()
    exact = (kept * s * projection).sum(1)
    margin = (kept * s * 2 * theta).sum(1) * torch.linalg.matrix_norm(G.double(), 2)  # as above, summed
    assert bool(((model.coefficients.grad[p].double() - exact).abs() <= margin + 1e-4 * exact.abs()).all())
    other = model.offsets["blocks.0.qkv.weight"]
    assert model.mask_logits.grad[:, other: other + 32].abs().max() == 0  # other matrices untouched


def test_svd_is_cached_per_pool_and_a_stale_file_is_recomputed(loaded, tmp_path, monkeypatch):
    names = masked_names(loaded.task_vectors)
    first = AdaRank(PreloadedPool(loaded), cache_dir=tmp_path)
    path = svd_cache_path(loaded.task_vectors, names, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    stored = load_state_dict(path)  # s and the short side's singular vectors: V^T (tall), U (wide)
    assert stored["blocks.0.fc1.weight.basis"].shape == (3, 32, 32)  # V^T of [128, 32]
    assert stored["blocks.0.fc2.weight.basis"].shape == (3, 32, 32)  # U of [32, 128]
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    again = AdaRank(PreloadedPool(loaded), cache_dir=tmp_path)
    assert calls == []  # read from the file
    with torch.no_grad():
        a, b = first.merged.merged_parameters(), again.merged.merged_parameters()
    assert all(torch.equal(a[n], b[n]) for n in a)  # a computed and a cached SVD give the same model
    other_tv = TaskVectors(loaded.task_vectors.task_names, loaded.task_vectors.names,
                           [1.5 * t for t in loaded.task_vectors.tensors])
    other = svd_cache_path(other_tv, names, tmp_path)
    assert other != path and svd_cache_path(loaded.task_vectors, names[:2], tmp_path) != path
    # a file that does not belong to these task vectors (copied, or a hash collision) is recomputed
    other.write_bytes(path.read_bytes())
    svd_subspaces(other_tv, names, tmp_path)
    assert len(calls) == len(names)
    calls.clear()
    svd_subspaces(other_tv, names, tmp_path)
    assert calls == []


def test_training_lowers_entropy_checkpoints_masks_resumes_and_refuses_other_methods(loaded, tmp_path):
    pool = PreloadedPool(loaded)
    seen, kept = [], []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/entropy"]))
            kept.append(float(trainer.callback_metrics["mask/kept"]))
    model = AdaRank(pool, lr=1e-2, cache_dir=tmp_path / "svd")
    tr = trainer(tmp_path / "run", 20, [Rec()], log_every_n_steps=1)  # mask/kept: logging steps only
    tr.fit(model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    assert sum(seen[-5:]) / 5 < sum(seen[:5]) / 5, seen
    assert kept[0] == 1.0 and kept[-1] < 1.0  # some components were pruned
    tr.save_checkpoint(tmp_path / "adarank.ckpt")
    ckpt = read_checkpoint(tmp_path / "adarank.ckpt")
    assert ckpt["adamerge"]["method"] == "adarank"
    assert set(ckpt["state_dict"]) == {COEFFICIENTS_KEY, MASK_LOGITS_KEY}
    fresh = AdaRank(pool, cache_dir=tmp_path / "svd")
    fresh.load_coefficients(tmp_path / "adarank.ckpt")
    assert torch.equal(fresh.merged.mask_logits, model.merged.mask_logits)
    assert torch.equal(fresh.merged.coefficients, model.merged.coefficients)
    assert fresh.merged.mask_table() == model.merged.mask_table()
    # another method's checkpoint is refused both ways, in one line; init_from takes coefficients
    ada = AdaMerging(pool, lr=1e-2)
    tr = trainer(tmp_path / "ada", 2)
    tr.fit(ada, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    tr.save_checkpoint(tmp_path / "ada.ckpt")
    with pytest.raises(ValueError, match="by method 'adamerging', this run is 'adarank'.*init_from") as e:
        fresh.load_coefficients(tmp_path / "ada.ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="written by method 'adarank', this run is 'adamerging'"):
        AdaMerging(pool).load_coefficients(tmp_path / "adarank.ckpt")
    started = AdaRank(pool, init_from=str(tmp_path / "ada.ckpt"), cache_dir=tmp_path / "svd")
    assert torch.equal(started.merged.coefficients, ada.merged.coefficients)


def test_masks_train_alone_and_per_task_backward_gives_the_same_gradients(loaded, tmp_path):
    pool = PreloadedPool(loaded)
    model = AdaRank(pool, lr=5e-2, learn_coefficients=False, cache_dir=tmp_path)
    trainer(tmp_path / "run", 4).fit(model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    assert torch.equal(model.merged.coefficients, torch.full_like(model.merged.coefficients, 0.3))
    assert not torch.equal(model.merged.mask_logits, torch.full_like(model.merged.mask_logits, 0.1))
    batch = {t: (images(t, 8), torch.arange(8)) for t in model.task_names}
    grads = []
    for per_task in (False, True):
        m = AdaRank(pool, initial_rank_ratio=0.5, per_task_backward=per_task, cache_dir=tmp_path)
        random_coefficients(m, seed=4)
        m.training_step(batch, 0).backward()  # no trainer: nothing logged, nothing warned
        grads.append((m.merged.coefficients.grad, m.merged.mask_logits.grad))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads))


def test_export_writes_the_masked_merge(loaded, tmp_path):
    pool = PreloadedPool(loaded)
    model = AdaRank(pool, lr=5e-2, cache_dir=tmp_path / "svd")
    tr = trainer(tmp_path / "run", 3)
    tr.fit(model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=16))
    tr.save_checkpoint(tmp_path / "a.ckpt")
    paths = export(AdaRank(pool, cache_dir=tmp_path / "svd"), tmp_path / "a.ckpt", tmp_path / "out")
    merged = load_state_dict(paths["merged"])
    want = model.merged.merged_state_dict()
    assert set(merged) == set(want) and all(torch.equal(merged[k], want[k]) for k in want)
    x = images("shapes")
    with torch.no_grad():
        assert torch.allclose(functional_call(loaded.encoder, merged, (x,)), model.merged(x), atol=1e-6)


def test_registry_row_and_the_command_line(tmp_path):
    m = registry.get("adarank")
    assert m.kind == "learned" and m.build is AdaRank and m.bench and not m.demo  # --methods adarank
    assert m.defaults()["prior"] == 0.3 and m.defaults()["clamp"] is False
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    fit = [sys.executable, "-m", "adamerge", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
           "--model.class_path", "adamerge.methods.AdaRank",
           "--model.init_args.cache_dir", str(tmp_path / "svd"),
           "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
           "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    proc = subprocess.run(fit, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert ckpt["adamerge"]["method"] == "adarank" and MASK_LOGITS_KEY in ckpt["state_dict"]


@pytest.mark.parametrize("ratio", [0.25, 0.75, 1.0])
def test_a_fixed_mask_merges_the_smaller_side_and_equals_the_training_forward(loaded, tmp_path, ratio, monkeypatch):
    """Without gradients (evaluation, export) each masked matrix is merged from its kept
    components (ratio 0.25) or as the dense merge minus its pruned ones (0.75; all kept: the dense
    merge alone), with products of only those columns; the result is the training forward's up to
    float32 SVD round-off (the same bound as the all-kept comparison above)."""
    import adamerge.methods.adarank as adarank
    rank = AdaRank(PreloadedPool(loaded), initial_rank_ratio=ratio, cache_dir=tmp_path)
    random_coefficients(rank, seed=2)
    full = {n: p.detach() for n, p in rank.merged.merged_parameters().items()}  # grad on: every component
    widths = []
    real = adarank.subspace_merge
    monkeypatch.setattr(adarank, "subspace_merge", lambda b, left, right, s: widths.append(left.shape[1]) or
                        real(b, left, right, s))
    with torch.no_grad():
        fixed = rank.merged.merged_parameters()
    assert list(fixed) == list(full)
    assert max(float((fixed[n] - full[n]).abs().max()) for n in full) <= 1e-5
    k = rank.merged.task_vectors.num_tasks
    assert len(widths) == len(rank.merged.ranks)
    for width, r in zip(widths, rank.merged.ranks.values()):
        kept = int(r * ratio) * k
        assert width == min(kept, k * r - kept)  # only the smaller side is multiplied
