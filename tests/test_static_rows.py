"""The static rows of issue 33 (MagMax, Model Stock, LiNeS, DELLA, PCB-merging, WUDI-merging)
against hand computations and float64 transcriptions of the official rules."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import registry
from adamerge.methods.lines import block_depths, lines
from adamerge.methods.magnitude_merges import della, della_task_vectors, magmax, pcb
from adamerge.methods.model_stock import model_stock
from adamerge.methods.static import task_arithmetic, ties
from adamerge.methods.wudi import _quadratic_terms, interference_loss, wudi, wudi_matrix
from adamerge.models.layout import infer_layout
from adamerge.suites.synthetic import TinyViT

NEW_MODULES = {"adamerge.methods.magnitude_merges", "adamerge.methods.model_stock", "adamerge.methods.lines",
               "adamerge.methods.wudi"}


def random_pool(shapes: dict[str, tuple[int, ...]], k: int = 3, seed: int = 0):
    """K random task vectors over parameters of ``shapes`` and a random base."""
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    tv = TaskVectors([f"t{i}" for i in range(k)], names, [torch.randn((k, *shapes[n]), generator=g) for n in names])
    return tv, {n: torch.randn(shapes[n], generator=g) for n in names}


def test_the_rows_are_registered_static_with_their_profile():
    rows = [n for n in registry.names() if registry.get(n).build.__module__ in NEW_MODULES]
    assert len(rows) == 6
    for name in rows:
        m = registry.get(name)
        assert m.kind == "static" and not m.demo and m.source
        profile = m.profile()
        assert profile["models"] == "1" and profile["storage"] == "-"
        assert profile["data"] == ("labeled val (tuning)" if m.tune else "-")


# ------------------------------------------------------------------------------------- MagMax


def test_magmax_picks_the_largest_magnitude_the_last_task_on_ties():
    tau = torch.tensor([[1.0, -3.0, 0.5, 2.0],
                        [-2.0, 1.0, -0.5, 0.1],
                        [0.5, 2.5, 0.4, -2.0]])
    tv = TaskVectors(["a", "b", "c"], ["w"], [tau])
    base = {"w": torch.ones(4)}
    # column 2: |0.5| = |-0.5| and the later (b) wins; column 3: |2| = |-2|, c wins
    chosen = torch.tensor([-2.0, -3.0, -0.5, -2.0])
    torch.testing.assert_close(magmax(tv, base)["w"], 1 + 0.5 * chosen)
    torch.testing.assert_close(magmax(tv, base, scaling=1.0)["w"], 1 + chosen)
    assert registry.get("magmax").defaults() == {"scaling": 0.5}
    with pytest.raises(ValueError, match="magmax: scaling must be >= 0"):
        magmax(tv, base, scaling=-1.0)


# -------------------------------------------------------------------------------- Model Stock


def test_model_stock_by_hand():
    """Angles 90, 45, 45 degrees: mean 60, cos 0.5, t = 3 * 0.5 / (2 * 0.5 + 1) = 0.75, so
    ``base + 0.75 * mean`` = base + 0.75 * (2/3, 2/3) = base + 0.5."""
    tau = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tv = TaskVectors(["a", "b", "c"], ["w"], [tau])
    base = {"w": torch.tensor([2.0, -1.0])}
    torch.testing.assert_close(model_stock(tv, base)["w"], torch.tensor([2.5, -0.5]))
    # mergekit's mean of the cosines: (0 + 2 / sqrt 2) / 3
    cos = math.sqrt(2) / 3
    t = 3 * cos / (2 * cos + 1)
    torch.testing.assert_close(model_stock(tv, base, average="cosine")["w"],
                               base["w"] + t * torch.tensor([2 / 3, 2 / 3]))


def test_model_stock_two_models_per_tensor_and_errors():
    """Two models: the paper's ``t = 2 cos / (1 + cos)``, one ratio per tensor."""
    u, v = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 5.0, 5.0])
    tv = TaskVectors(["a", "b"], ["x", "y"], [torch.stack([u, v]), torch.stack([u, u])])
    base = {"x": torch.zeros(3), "y": torch.zeros(3)}
    out = model_stock(tv, base)
    cos = 20.0 / (5.0 * math.sqrt(50.0))
    torch.testing.assert_close(out["x"], 2 * cos / (1 + cos) * (u + v) / 2)
    torch.testing.assert_close(out["y"], u, rtol=1e-6, atol=1e-6)  # parallel vectors: t = 1
    with pytest.raises(ValueError, match="model_stock: needs at least 2 task vectors"):
        model_stock(TaskVectors(["a"], ["x"], [u[None]]), base)
    with pytest.raises(ValueError, match="model_stock: average must be one of"):
        model_stock(tv, base, average="median")


# -------------------------------------------------------------------------------------- LiNeS


def vit_pool(depth: int = 3, k: int = 3):
    enc = TinyViT(image_size=8, patch=4, dim=8, depth=depth, heads=2, out_dim=8)
    base = {n: p.detach().clone() for n, p in enc.named_parameters()}
    g = torch.Generator().manual_seed(1)
    tv = TaskVectors([f"t{i}" for i in range(k)], list(base),
                     [torch.randn((k, *p.shape), generator=g) for p in base.values()])
    return enc, tv, base


def test_lines_depths_agree_with_the_pool_layout():
    enc, tv, _ = vit_pool(depth=3)
    blocks = infer_layout(enc).blocks
    depth = block_depths(tv.names)
    assert depth == block_depths(tv.names, blocks)
    assert {depth[n] for n in tv.names if n.startswith("blocks.0.")} == {0.0}
    assert {depth[n] for n in tv.names if n.startswith("blocks.2.")} == {1.0}
    assert "patch_embed.weight" not in depth and "proj.weight" not in depth
    assert block_depths(["visual.transformer.resblocks.1.attn.in_proj_weight",
                         "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.conv1.weight"]) == {
        "visual.transformer.resblocks.1.attn.in_proj_weight": 1.0, "visual.transformer.resblocks.0.mlp.c_fc.weight": 0.0}


def test_lines_first_block_is_the_base_and_last_is_task_arithmetic_at_alpha_zero():
    _, tv, base = vit_pool(depth=3)
    out = lines(tv, base, scaling=0.4, alpha=0.0)
    ta = task_arithmetic(tv, base, scaling=0.4)
    middle = block_depths(tv.names)
    for name in tv.names:
        if name.startswith("blocks.0.") or name not in middle:
            torch.testing.assert_close(out[name], base[name])
        elif name.startswith("blocks.2."):
            torch.testing.assert_close(out[name], ta[name])
        else:  # blocks.1: half way
            torch.testing.assert_close(out[name], task_arithmetic(tv, base, scaling=0.2)[name])


def test_lines_official_alpha_is_one_over_k_for_task_arithmetic_and_a_mass_ratio_for_ties():
    _, tv, base = vit_pool(depth=3)
    out = lines(tv, base, scaling=0.3)
    k = tv.num_tasks
    for name, tau in zip(tv.names, tv.tensors):
        factor = 1 / k + (0.3 if name.startswith("blocks.2.") else 0.15 if name.startswith("blocks.1.") else 0.0)
        torch.testing.assert_close(out[name], base[name] + factor * tau.sum(0), rtol=1e-5, atol=1e-5)
    # TIES as the multi-task vector: alpha = |sum tau|_1 / |ties|_1 / K (wang-kee/LiNeS aggregation.py L175-178)
    merged = {n: ties(tv, {n: torch.zeros_like(b) for n, b in base.items()}, keep=0.2)[n] for n in tv.names}
    alpha = sum(float(t.sum(0).abs().sum()) for t in tv.tensors) / sum(float(m.abs().sum()) for m in merged.values()) / k
    out = lines(tv, base, scaling=0.3, merge="ties")
    torch.testing.assert_close(out["blocks.0.fc1.weight"], base["blocks.0.fc1.weight"] + alpha * merged["blocks.0.fc1.weight"])
    torch.testing.assert_close(out["proj.weight"], base["proj.weight"] + alpha * merged["proj.weight"])
    with pytest.raises(ValueError, match="lines: merge must be one of"):
        lines(tv, base, merge="dare")
    with pytest.raises(ValueError, match="lines: alpha must be >= 0"):
        lines(tv, base, alpha=-0.1)


# -------------------------------------------------------------------------------------- DELLA

DELLA_SHAPES = {"w": (4, 6), "b": (5,), "pos": (2, 3, 4), "one": (1,)}


def della_by_hand(tv: TaskVectors, base, density, epsilon, scaling, seed):
    """mergekit's ``della`` (sparsify.py L138-175 + generalized_task_arithmetic.py L119-184), in
    float64, row by row with Python sorting, on our draws (U[0, 1) per entry, in parameter order)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tau in zip(tv.names, tv.tensors):
        u = torch.rand(tau.shape, generator=gen).double()
        pruned = []
        for k in range(tau.shape[0]):
            t = tau[k].double()
            rows = t.reshape(1, -1) if t.dim() < 2 else t.movedim(1, -1).reshape(-1, t.shape[1])
            uk = u[k].reshape(1, -1) if t.dim() < 2 else u[k].movedim(1, -1).reshape(-1, t.shape[1])
            kept = torch.zeros_like(rows)
            for r in range(rows.shape[0]):
                row = rows[r].tolist()
                n = len(row)
                order = sorted(range(n), key=lambda i: abs(row[i]))
                for rank, i in enumerate(order):
                    frac = rank / (n - 1) if n > 1 else 0.5
                    p = (density - epsilon) + frac * 2 * epsilon
                    kept[r, i] = row[i] if uk[r, i] < p else 0.0
            kept = kept.reshape(t.shape) if t.dim() < 2 else kept.reshape(*t.movedim(1, -1).shape).movedim(-1, 1)
            if t.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
                kept = kept * (t.abs().sum() / kept.abs().sum())
            pruned.append(kept)
        d = torch.stack(pruned)
        majority = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
        mask = torch.sign(d) == majority
        divisor = mask.sum(0).double()
        divisor[divisor == 0] = 1
        out[name] = base[name].double() + scaling * (d * mask).sum(0) / divisor
    return out


def test_della_matches_a_float64_transcription_of_mergekit():
    tv, base = random_pool(DELLA_SHAPES, k=3)
    got = della(tv, base, density=0.6, epsilon=0.2, scaling=0.8, seed=5)
    want = della_by_hand(tv, base, 0.6, 0.2, 0.8, 5)
    for name in tv.names:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-5)


def test_della_is_seeded_deterministic_and_keeps_large_magnitudes_more_often():
    tv, base = random_pool({"w": (64, 256)}, k=2)
    a, b = della(tv, base, seed=3), della(tv, base, seed=3)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], della(tv, base, seed=4)["w"])
    # seed 7: the pool's own randn came from seed 0's stream, which would correlate with the draws
    pruned = della_task_vectors(tv, density=0.5, epsilon=0.3, seed=7)
    assert pruned.meta["transform"] == "della(density=0.5,epsilon=0.3,seed=7,rescale=l1)"
    tau, kept = tv.tensors[0], pruned.tensors[0] != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    big = tau.abs() > tau.abs().median(dim=-1, keepdim=True).values
    # keep probabilities 0.2 .. 0.8 by rank: 0.65 on average over the larger half, 0.35 over the smaller
    assert abs(kept[big].float().mean() - 0.65) < 0.02 and abs(kept[~big].float().mean() - 0.35) < 0.02
    # L1 mass of every task tensor restored (mergekit's rescale)
    torch.testing.assert_close(pruned.tensors[0].abs().sum((1, 2)), tau.abs().sum((1, 2)))
    # probability rescaling: unbiased per entry
    prob = della_task_vectors(tv, density=0.5, epsilon=0.3, seed=7, rescale="probability").tensors[0]
    assert ((prob[kept] / tau[kept]) >= 1.0 / 0.8 - 1e-5).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"density": 0.0}, "della: density must be in"),
    ({"density": 0.9, "epsilon": 0.15}, "della: epsilon must keep density"),
    ({"epsilon": -0.1}, "della: epsilon must be >= 0"),
    ({"rescale": "l2"}, "della: rescale must be one of"),
])
def test_della_hyperparameters_are_checked_in_one_line(kwargs, message):
    tv, base = random_pool({"w": (3, 4)})
    with pytest.raises(ValueError, match=message) as err:
        della(tv, base, **kwargs)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- PCB


def pcb_by_hand(flat: torch.Tensor, ratio: float, lam: float, clip: float) -> torch.Tensor:
    """duguodong7/pcb-merging vision_source_code/pcb.py L56-105 on the flat ``[K, d]`` task
    vectors of the whole model, in float64."""
    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    def clamp(x, min_ratio, max_ratio):
        d = x.size(1)
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    n = flat.shape[0]
    mags = clamp(flat.abs(), clip, clip)
    clamped = torch.sign(flat) * mags
    signed_unit = torch.sign(flat) * normalize(mags)
    balancing = torch.exp(n * normalize(mags) ** 2) * torch.tanh(flat * signed_unit.sum(0))
    scale = normalize(clamp(balancing, 1 - ratio, 0))
    tvs = clamped * lam
    return (tvs * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)


@pytest.mark.parametrize("ratio, clip", [(0.05, 0.01), (0.3, 0.02)])
def test_pcb_matches_a_float64_transcription_over_the_whole_flat_vector(ratio, clip):
    tv, base = random_pool({"w": (12, 20), "b": (40,), "pos": (2, 5, 3)}, k=4, seed=2)
    got = pcb(tv, base, ratio=ratio, scaling=1.2, clip=clip)
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in tv.tensors], dim=1).double()
    want = pcb_by_hand(flat, ratio, 1.2, clip)
    start = 0
    for name, tau in zip(tv.names, tv.tensors):
        size = tau[0].numel()
        merged = want[start:start + size].reshape(tau.shape[1:])
        torch.testing.assert_close(got[name].double(), base[name].double() + merged, rtol=1e-5, atol=1e-5)
        start += size
    assert (got["w"] != base["w"]).float().mean() < 1.0  # entries no task weighs stay at the base


def test_pcb_hyperparameters_are_checked():
    tv, base = random_pool({"w": (3, 4)})
    for kwargs, message in (({"ratio": 0.0}, "pcb: ratio must be in"), ({"clip": 0.5}, "pcb: clip must be in"),
                            ({"scaling": -1.0}, "pcb: scaling must be >= 0")):
        with pytest.raises(ValueError, match=message):
            pcb(tv, base, **kwargs)


# --------------------------------------------------------------------------------------- WUDI


def test_wudi_lowers_its_interference_loss_from_the_task_arithmetic_start():
    tv, base = random_pool({"w": (24, 16), "b": (24,)}, k=4, seed=3)
    out = wudi(tv, base)  # the defaults: 400 Adam steps, lr 1e-5
    tau = tv.tensors[0]
    start = interference_loss(tau.sum(0), tau)
    end = interference_loss(out["w"] - base["w"], tau)
    assert end < start
    torch.testing.assert_close(out["b"], base["b"] + tv.tensors[1].mean(0))  # not a matrix: the mean
    more = wudi(tv, base, steps=2000, lr=1e-3)
    assert interference_loss(more["w"] - base["w"], tau) < 0.5 * start


def test_wudi_gradient_and_steps_match_the_official_autograd_loop():
    """fusion_bench/method/wudi/wudi.py L37-54 in float64 (autograd, torch Adam) against our
    closed-form gradient."""
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 10, 6, generator=g)
    a, b = _quadratic_terms(tau.double())
    m = (tau.sum(0) + 0.1 * torch.randn(10, 6, generator=g)).double().requires_grad_()
    t64 = tau.double()
    norms = t64.reshape(3, -1).norm(dim=-1).square()
    loss = (((m.unsqueeze(0) - t64) @ t64.transpose(1, 2)).square() / norms[:, None, None]).sum()
    loss.backward()
    torch.testing.assert_close(m.grad, 2 * (m.detach() @ a - b))
    torch.testing.assert_close(interference_loss(m.detach(), t64), loss.detach())

    merged = torch.nn.Parameter(t64.sum(0).clone())
    opt = torch.optim.Adam([merged], lr=1e-3, weight_decay=0)
    for _ in range(30):
        loss = (((merged.unsqueeze(0) - t64) @ t64.transpose(1, 2)).square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(wudi_matrix(tau, 30, 1e-3).double(), merged.detach(), rtol=1e-5, atol=1e-5)


def test_wudi_hyperparameters_are_checked():
    tv, base = random_pool({"w": (3, 4)})
    with pytest.raises(ValueError, match="wudi: steps must be an integer >= 0"):
        wudi(tv, base, steps=-1)
    with pytest.raises(ValueError, match="wudi: lr must be > 0"):
        wudi(tv, base, lr=0.0)
