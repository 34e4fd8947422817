"""``data.task_steps``: one optimizer step per task batch, tasks in turn (SyMerge/Tinting's and
FusionBench Surgery's schedule). The stream's step ``s`` holds only task ``s mod T``, with that
task's ``s // T``-th batch of the all-task stream; a resume is exact; a fit of ``T`` steps is
``T`` single-task steps of one optimizer; without the option nothing changes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from adamerge import AdaMerging, MultiTaskDataModule, Surgery, Tinting
from adamerge.data.datamodule import AdaptationStream
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer

TASKS = SuiteSource("tiny").task_names()  # digits, shapes, gratings: 200 test images each
T = len(TASKS)


def tiny() -> PreloadedPool:
    return PreloadedPool(SuitePool("tiny").load())


def stream(task_steps: bool, batch_size: int = 16, **kw) -> AdaptationStream:
    source = SuiteSource("tiny")
    return AdaptationStream({t: source.dataset(t, "test") for t in TASKS}, batch_size, seed=3,
                            task_steps=task_steps, **kw)


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(x, y) for t in a for x, y in zip(a[t], b[t]))


class Batches(L.Callback):
    """The batches a fit trained on, and the per-task losses it logged at each step."""

    def __init__(self) -> None:
        self.batches, self.logged = [], []

    def on_fit_start(self, trainer, pl_module):
        log = pl_module._log_train

        def logged(loss, losses):  # what is handed to the logging of the per-task losses
            self.logged.append(sorted(losses))
            return log(loss, losses)
        pl_module._log_train = logged

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({t: tuple(x.clone() for x in v) for t, v in batch.items()})


def test_the_stream_yields_one_task_per_step_in_turn_each_with_its_own_batches():
    one, every = stream(True), stream(False)
    # 200 images / 16: a task's 13th batch (k = 12) crosses into its second pass
    for s in range(14 * T):
        task, k = TASKS[s % T], s // T
        assert one.task_at(s) == (s % T, k)
        got = one.batch(s)
        assert list(got) == [task]
        assert same(got, {task: every.batch(k)[task]})  # the images of the all-task stream's step k
    # each task walks its own permutation: its first 12 batches are 192 distinct images
    for t in TASKS:
        seen = torch.cat([one.batch(s)[t][1] for s in range(TASKS.index(t), 12 * T, T)])
        assert seen.unique().numel() == 192
    assert [one.units()(t, i) for t in TASKS for i in (0, 57, 199)] == \
        [every.units()(t, i) for t in TASKS for i in (0, 57, 199)]
    # the data module's option reaches its stream and its loader, in the module's task order
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16, seed=3, task_steps=True)
    dm.select_tasks(list(reversed(TASKS)))
    loader = iter(dm.train_dataloader())
    for s in range(2 * T):
        assert list(next(loader)) == [list(reversed(TASKS))[s % T]]


def test_a_resumed_stream_continues_with_the_same_batches():
    whole = stream(True)
    for start in (1, 4, 7):
        resumed = iter(stream(True, start_step=start))
        for s in range(start, start + 2 * T):
            assert same(next(resumed), whole.batch(s))
    # two ranks: their shares of each step make up the one-process batch
    for s in range(2 * T):
        parts = [stream(True, rank=r, world_size=2).batch(s) for r in (0, 1)]
        assert list(parts[0]) == list(parts[1]) == list(whole.batch(s))
        t = TASKS[s % T]
        assert same({t: tuple(torch.cat([p[t][i] for p in parts]) for i in range(2))}, whole.batch(s))


def test_a_fit_of_t_steps_is_t_single_task_steps_of_one_optimizer(tmp_path):
    pool, bs = tiny(), 8
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=bs, seed=1, task_steps=True)
    rec = Batches()
    fitted = Tinting(pool)
    init = {k: v.clone() for k, v in fitted.learned_state().items()}
    trainer(tmp_path, 2 * T, callbacks=[rec]).fit(fitted, dm)
    assert [list(b) for b in rec.batches] == [[TASKS[s % T]] for s in range(2 * T)]
    assert rec.logged[0] == [TASKS[0]]  # the per-task loss of the task present, only

    # by hand: one Adam over the same tensors; step s is task s mod T alone, on its (s // T)-th
    # batch of the all-task stream, through the objective directly (no Lightning, no stream option)
    manual = Tinting(pool)
    every = MultiTaskDataModule(SuiteSource("tiny"), batch_size=bs, seed=1)
    every.select_tasks(TASKS)
    full = every.adaptation_stream()
    manual.use_adaptation_data({t: every.adaptation_dataset(t) for t in TASKS}, units=full.units())
    opt = torch.optim.Adam(manual.trainable_parameters(), lr=manual.lr)
    for s in range(2 * T):
        t = TASKS[s % T]
        images, index = full.batch(s // T)[t]
        assert same(rec.batches[s], {t: (images, index)})
        opt.zero_grad(set_to_none=True)
        manual.task_losses({t: images}, {t: index}, manual.merged.merged_parameters())[t].backward()
        opt.step()
        if s == 0:  # a single-task step leaves the other tasks' heads exactly as they were
            for other in TASKS[1:]:
                head = manual.task_modules[other].linear
                assert head.weight.grad is None and torch.equal(
                    head.weight, init[f"task_modules.{other}.linear.weight"])
    got, want = fitted.learned_state(), manual.learned_state()
    assert list(got) == list(want)
    for k in want:
        assert not torch.equal(want[k], init[k]), k  # every learned tensor moved
        # float32 arithmetic in another order (the fit merges into reused buffers): a few ulps
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6 * float(want[k].abs().max()))


@pytest.mark.parametrize("make", [lambda p: AdaMerging(p, lr=1e-2),
                                  lambda p: AdaMerging(p, lr=1e-2, per_task_backward=True),
                                  lambda p: Surgery(p, rank=4)], ids=["adamerging", "per_task", "surgery"])
def test_single_task_batches_train_adamerging_and_surgery(tmp_path, make):
    model = make(tiny())
    init = {k: v.clone() for k, v in model.learned_state().items()}
    rec = Batches()
    trainer(tmp_path, T, callbacks=[rec]).fit(
        model, MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, task_steps=True))
    assert [list(b) for b in rec.batches] == [[t] for t in TASKS]
    assert rec.logged[0] == [TASKS[0]]
    state = model.learned_state()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], init[k]) for k in state)


def test_without_the_option_a_fit_trains_on_the_all_task_stream_and_refuses_a_missing_task(tmp_path):
    model, rec = AdaMerging(tiny(), lr=1e-2), Batches()
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, seed=2, task_steps=False)
    trainer(tmp_path, 3, callbacks=[rec]).fit(model, dm)
    full = stream(False, batch_size=8)
    full.seed = 2
    for s, b in enumerate(rec.batches):
        assert same(b, full.batch(s))  # every task, the batches of the stream as before
    assert rec.logged[0] == sorted(TASKS)
    with pytest.raises(ValueError, match="no data for tasks"):
        model.adaptation_step({TASKS[0]: full.batch(0)[TASKS[0]]}, 0)
