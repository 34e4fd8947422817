"""The Lightning module end to end: entropy drops, checkpoints are tiny, resume continues."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from adamerge import AdaMerging, InMemorySource, MultiTaskDataModule
from adamerge.io.run_checkpoint import RunCheckpoint
from adamerge.suites.synthetic import SuitePool, SuiteSource
from conftest import RandomPool, images


class Recorder(L.Callback):
    def __init__(self):
        self.entropy = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.entropy.append(float(trainer.callback_metrics["train/entropy"]))


def trainer(root: Path, steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", devices=1,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     check_val_every_n_epoch=None, val_check_interval=10_000, limit_val_batches=0,
                     callbacks=list(callbacks), **kw)


def random_data(tasks=("a", "b", "c"), n=40, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return InMemorySource({t: {"test": TensorDataset(images(n, seed + i), torch.randint(0, classes, (n,), generator=g))}
                           for i, t in enumerate(tasks)})


def test_fit_on_tiny_suite_lowers_entropy(tmp_path):
    rec = Recorder()
    model = AdaMerging(SuitePool("tiny"), granularity="layerwise", lr=1e-2)
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16)
    trainer(tmp_path, 40, [rec]).fit(model, dm)
    first, last = sum(rec.entropy[:5]) / 5, sum(rec.entropy[-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert not torch.allclose(model.merged.coefficients, torch.full_like(model.merged.coefficients, 0.3))


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


def test_checkpoint_holds_only_coefficients(tmp_path):
    model = AdaMerging(RandomPool(), granularity="layerwise")
    ckpt = RunCheckpoint(every_n_train_steps=2, save_last=True)
    trainer(tmp_path, 4, [ckpt]).fit(model, MultiTaskDataModule(random_data(), batch_size=4))
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert path.stat().st_size < 1_000_000
    saved = torch.load(path, weights_only=False)
    assert list(saved["state_dict"]) == ["merged.coefficients"]
    coeff_numel = model.merged.coefficients.numel()
    assert max(t.numel() for t in all_tensors(saved)) <= coeff_numel
    assert saved["adamerge"]["fingerprint"]["tasks"] == ["a", "b", "c"]


def test_resume_continues_from_saved_step_and_matches_uninterrupted(tmp_path):
    dm = lambda: MultiTaskDataModule(random_data(), batch_size=4, seed=3)
    full = AdaMerging(RandomPool(), lr=0.05)
    trainer(tmp_path / "full", 12).fit(full, dm())
    part = AdaMerging(RandomPool(), lr=0.05)
    trainer(tmp_path / "part", 6, [RunCheckpoint(every_n_train_steps=3, save_last=True)]).fit(part, dm())
    resumed = AdaMerging(RandomPool(), lr=0.05)
    t = trainer(tmp_path / "part", 12, [RunCheckpoint(every_n_train_steps=3, save_last=True)])
    t.fit(resumed, dm(), ckpt_path="last")
    assert t.global_step == 12
    torch.testing.assert_close(resumed.merged.coefficients, full.merged.coefficients, rtol=0, atol=1e-6)


def test_resume_refuses_other_pool(tmp_path):
    model = AdaMerging(RandomPool(seed=0))
    trainer(tmp_path, 2, [RunCheckpoint(every_n_train_steps=1, save_last=True)]).fit(
        model, MultiTaskDataModule(random_data(), batch_size=4))
    other = AdaMerging(RandomPool(seed=5))
    with pytest.raises(ValueError, match="different model pool: weights differ"):
        trainer(tmp_path, 4).fit(other, MultiTaskDataModule(random_data(), batch_size=4), ckpt_path="last")


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_per_task_backward_matches_joint(tmp_path, granularity):
    out = []
    for per_task in (False, True):
        model = AdaMerging(RandomPool(), granularity=granularity, lr=0.05, per_task_backward=per_task)
        trainer(tmp_path / str(per_task), 3).fit(model, MultiTaskDataModule(random_data(), batch_size=4))
        out.append(model.merged.coefficients.detach())
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_validate_reports_per_task_accuracy(tmp_path):
    model = AdaMerging(RandomPool())
    t = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    res = t.validate(model, MultiTaskDataModule(random_data(), eval_batch_size=16))
    keys = set().union(*res)
    assert {"val/acc/a", "val/acc/b", "val/acc/c", "val/acc_avg"} <= keys
    accs = model.last_accuracies
    assert all(0 <= a <= 100 for a in accs.values()) and len(accs) == 3


def test_label_outside_head_classes_is_an_error(tmp_path):
    model = AdaMerging(RandomPool(classes=5))
    data = random_data(classes=9, seed=1)
    t = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(ValueError, match="task 'a': label .* outside the head's 5 classes"):
        t.validate(model, MultiTaskDataModule(data, eval_batch_size=40))


def test_missing_task_in_data_is_an_error(tmp_path):
    model = AdaMerging(RandomPool())
    with pytest.raises(ValueError, match=r"no data for tasks \['c'\]"):
        trainer(tmp_path, 1).fit(model, MultiTaskDataModule(random_data(tasks=("a", "b")), batch_size=2))


class StepMetrics(L.Callback):
    """The step metrics a logger would receive (what Lightning flushes after each step)."""

    def __init__(self):
        self.written = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer._logger_connector.should_update_logs:
            self.written.append((trainer.global_step, set(trainer.logged_metrics)))


def test_detailed_metrics_are_logged_only_on_logging_steps(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger
    model = AdaMerging(RandomPool(), granularity="layerwise")
    calls = []
    log = type(model).log
    monkeypatch.setattr(type(model), "log", lambda self, name, *a, **k: (calls.append(name), log(self, name, *a, **k)))
    seen = StepMetrics()
    t = L.Trainer(default_root_dir=tmp_path, max_steps=6, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                  log_every_n_steps=3, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  callbacks=[seen])
    t.fit(model, MultiTaskDataModule(random_data(), batch_size=4))
    # the loss every step (progress bar); per-task losses and coefficients only on steps 3 and 6
    assert calls.count("train/entropy") == 6
    assert calls.count("coef/mean") == 2 and calls.count("train/entropy/a") == 2 and calls.count("coef/b") == 2
    # and nothing the logger writes is lost: each written step has every metric
    assert [s for s, _ in seen.written] == [3, 6]
    assert all({"train/entropy", "train/entropy/a", "coef/mean", "coef/c"} <= m for _, m in seen.written)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"coef/mean", "coef/a", "train/entropy/b"} <= set(header)
    assert len(rows) == 3  # the header and the two written steps
