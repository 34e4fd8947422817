"""Concrete AdaMerging: one mask shared by the tasks and rescaled by its mean per tensor; phase 1's
step is the first-order meta-step written out in float64; with a mask of ones phase 2 is layer-wise
AdaMerging; a run resumed in phase 1 or at the phase boundary is the straight run, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.func import functional_call

from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods.concrete import ConcreteAdaMerging, ConcreteMaskedModel
from conftest import RandomPool
from test_adamerging import random_data, trainer


def data() -> MultiTaskDataModule:
    return MultiTaskDataModule(random_data(), batch_size=8)


class Batches(Callback):
    """Keeps every training batch."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)


def test_the_mask_is_shared_by_the_tasks_and_rescaled_by_its_mean():
    module = nn.Module()
    module.w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    module.b = nn.Parameter(torch.tensor([0.5, -0.5, 1.0]))
    tw = torch.tensor([[[1.0, -2.0], [0.5, 3.0]], [[2.0, 1.0], [-1.0, 0.25]]])
    tb = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 2.0]])
    merged = ConcreteMaskedModel(module, TaskVectors(["t1", "t2"], ["w", "b"], [tw, tb]))
    assert merged.mask_logits.shape == (7,)  # one logit per entry, not per task and entry
    with torch.no_grad():
        merged.coefficients.copy_(torch.tensor([[0.2, 0.5], [0.7, 0.1]]))
        merged.mask_logits.copy_(torch.tensor([50.0, -50.0, 50.0, 50.0, 50.0, 50.0, -50.0]))
        out = merged.merged_parameters()
    # kept entries at 1 / (fraction kept), dropped ones at 0, the same for both tasks
    mask_w = torch.tensor([[4 / 3, 0.0], [4 / 3, 4 / 3]])
    mask_b = torch.tensor([1.5, 1.5, 0.0])
    torch.testing.assert_close(out["w"], module.w + mask_w * (0.2 * tw[0] + 0.5 * tw[1]))
    torch.testing.assert_close(out["b"], module.b + mask_b * (0.7 * tb[0] + 0.1 * tb[1]))
    # phase 1's draws: each tensor's mask has mean 1, a draw is a function of its step
    with torch.no_grad():
        merged.mask_logits.zero_()
    draws = [merged.sample_mask(step) for step in (0, 0, 1)]
    for mask in draws:
        for m in mask:
            torch.testing.assert_close(m.mean(), torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not torch.equal(draws[0][0], draws[2][0])
    merged.eval_mask_type = "discrete"
    merged._eval_cache = None
    for m in merged.eval_mask():  # a 0/1 draw divided by its mean
        torch.testing.assert_close(m * (m > 0).sum() / m.numel(), (m > 0).float())


def test_a_mask_of_ones_makes_phase_two_layerwise_adamerging(tmp_path):
    concrete = ConcreteAdaMerging(RandomPool(), mask_steps=0, initial_logits=50.0)
    torch.testing.assert_close(torch.cat([m.reshape(-1) for m in concrete.merged.eval_mask()]),
                               torch.ones(concrete.merged.mask_logits.numel()))
    plain = AdaMerging(RandomPool(), granularity="layerwise", clamp=False)
    for i, model in enumerate((concrete, plain)):
        trainer(tmp_path / str(i), 5).fit(model, data())
    start = torch.full_like(plain.merged.coefficients, 0.3)
    assert (plain.merged.coefficients - start).abs().min() > 1e-3  # every coefficient moved
    torch.testing.assert_close(concrete.merged.coefficients, plain.merged.coefficients, rtol=1e-5, atol=1e-6)
    assert torch.equal(concrete.merged.mask_logits, torch.full_like(concrete.merged.mask_logits, 50.0))


def adam(param: torch.Tensor, grad: torch.Tensor, state: dict, lr: float) -> torch.Tensor:
    """One step of Adam (betas 0.9, 0.999, eps 1e-8, bias-corrected), written out."""
    state["t"] = state.get("t", 0) + 1
    state["m"] = 0.9 * state.get("m", 0) + 0.1 * grad
    state["v"] = 0.999 * state.get("v", 0) + 0.001 * grad * grad
    m_hat, v_hat = state["m"] / (1 - 0.9 ** state["t"]), state["v"] / (1 - 0.999 ** state["t"])
    return param - lr * m_hat / (v_hat.sqrt() + 1e-8)


def test_phase_one_steps_are_the_first_order_meta_steps_in_float64(tmp_path):
    """Two phase-1 steps: each inner gradient at the coefficients as they stand (FusionBench forms
    the merge before resetting them), applied from 0.3 by an Adam (lr 1) whose moments persist; the
    logits' Adam (lr 1e-3) on the entropy at the stepped coefficients under the attached mask."""
    model = ConcreteAdaMerging(RandomPool(), mask_steps=2)
    seen = Batches()
    trainer(tmp_path, 2, [seen]).fit(model, data())
    loaded = RandomPool().load()
    tv, encoder = loaded.task_vectors, copy.deepcopy(loaded.encoder).double()
    heads = {t: copy.deepcopy(h).double() for t, h in loaded.heads.items()}
    base = {n: p.detach().double() for n, p in loaded.encoder.named_parameters()}
    taus = [t.double() for t in tv.tensors]

    def entropy_sum(lam: torch.Tensor, mask: list[torch.Tensor], batch) -> torch.Tensor:
        params = {n: base[n] + m * torch.einsum("k,k...->...", lam[p], tau)
                  for p, (n, tau, m) in enumerate(zip(tv.names, taus, mask))}
        total = 0
        for t, (x, _) in batch.items():
            logp = torch.log_softmax(heads[t](functional_call(encoder, params, (x.double(),), strict=False)), -1)
            total = total - (logp.exp() * logp).sum(-1).mean()
        return total

    eps = torch.finfo(torch.float32).eps
    lam0 = torch.full((len(taus), tv.num_tasks), 0.3, dtype=torch.float64)
    lam, z, inner_state, mask_state = lam0, torch.zeros(model.merged.mask_logits.shape, dtype=torch.float64), {}, {}
    for step, batch in enumerate(seen.batches):
        u = torch.rand(z.shape, generator=model.merged.generator(step)).clamp(eps, 1 - eps).double()
        logits = z.clone().requires_grad_(True)
        concrete = torch.sigmoid((logits + u.log() - (-u).log1p()) / 0.5)
        mask = [(c / c.mean()).reshape(t.shape[1:]) for c, t in zip(concrete.split([t[0].numel() for t in taus]), taus)]
        lam = lam.clone().requires_grad_(True)
        g, = torch.autograd.grad(entropy_sum(lam, [m.detach() for m in mask], batch), lam)
        lam = adam(lam0, g, inner_state, 1.0)
        gz, = torch.autograd.grad(entropy_sum(lam, mask, batch), logits)
        z = adam(z, gz, mask_state, 1e-3)
    torch.testing.assert_close(model.merged.coefficients.double(), lam, rtol=0, atol=1e-4)
    torch.testing.assert_close(model.merged.mask_logits.double(), z, rtol=0, atol=5e-5)
    assert (z.abs() > 1.5e-3).float().mean() > 0.5  # most logits took two steps the same way


@pytest.mark.parametrize("resume_at", [1, 3])  # in phase 1, and the phase boundary
def test_a_resumed_run_is_the_straight_run(tmp_path, resume_at):
    def run(folder, ckpt=None):
        model = ConcreteAdaMerging(RandomPool(), mask_steps=3)
        saved = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
        trainer(folder, 5, [saved]).fit(model, data(), ckpt_path=ckpt)
        return model
    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", next((tmp_path / "straight").glob(f"*step={resume_at}.ckpt")))
    for a, b in zip(straight.learned_state().values(), resumed.learned_state().values()):
        assert torch.equal(a, b)
    assert not torch.equal(straight.merged.mask_logits, torch.zeros_like(straight.merged.mask_logits))


def test_every_draw_comes_from_a_cpu_generator_and_fit_refuses_what_it_cannot_sync():
    """The fixed mask must be the same draw on a GPU (fit, test) and on the CPU (compare's evaluation
    after the fit, export): CPU and CUDA generators give different streams from one seed."""
    from types import SimpleNamespace
    model = ConcreteAdaMerging(RandomPool())
    assert model.merged.generator(0).device.type == "cpu" and model.merged.generator(-1).device.type == "cpu"
    first = [m.clone() for m in model.merged.eval_mask()]
    model.merged._eval_cache = None
    assert all(torch.equal(a, b) for a, b in zip(first, model.merged.eval_mask()))
    for world, precision, match in ((2, "32-true", "trains on one device"), (1, "16-mixed", "16-mixed")):
        model._trainer = SimpleNamespace(world_size=world, precision=precision)
        with pytest.raises(ValueError, match=match):
            model.on_fit_start()
    model._trainer = None
