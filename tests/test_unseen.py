"""Unseen tasks: evaluated with their heads on the merged model, never merged nor adapted on."""

import json

import lightning as L
import pytest
import torch

from adamerge.compare import CompareSettings, compare
from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.methods import AdaMerging, Tinting
from adamerge.models.pool import PreloadedPool
from adamerge.report import evaluate, markdown_table, terminal_table
from adamerge.suites.synthetic import SuitePool, SuiteSource


@pytest.fixture(scope="module")
def loaded():
    return SuitePool("tiny", unseen_tasks=["gratings"]).load()


def test_pool_splits_merged_and_unseen(loaded):
    assert loaded.task_vectors.task_names == ["digits", "shapes"]
    assert loaded.unseen_tasks == ["gratings"] and loaded.eval_tasks == ["digits", "shapes", "gratings"]
    full = SuitePool("tiny").load()  # the unseen head is the suite's own head for that task
    assert torch.equal(loaded.unseen_heads["gratings"].weight, full.heads["gratings"].weight)
    with pytest.raises(ValueError, match=r"unseen_tasks \['shapes'\] also have an expert"):
        SuitePool("tiny", tasks=["digits", "shapes"], unseen_tasks=["shapes"])
    with pytest.raises(ValueError, match="unknown unseen task 'grating' in suite 'tiny'; did you mean 'gratings'"):
        SuitePool("tiny", unseen_tasks=["grating"])


def test_compare_reports_unseen_rows(loaded, tmp_path):
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, eval_batch_size=256)
    settings = CompareSettings(steps=2, val_split=None)
    res = compare(loaded, dm, tmp_path, settings, methods=["base", "individual", "task_arithmetic",
                                                          "adamerging_layerwise"], say=lambda _: None)
    assert res["tasks"] == ["digits", "shapes"] and res["unseen_tasks"] == ["gratings"]
    rows = res["methods"]
    assert "gratings" not in rows["individual"]["per_task"] and rows["individual"]["avg_unseen"] is None
    test = {t: dm.eval_dataset(t) for t in loaded.eval_tasks}
    heads = {**loaded.heads, **loaded.unseen_heads}
    enc = loaded.encoder
    # base and task arithmetic on the unseen task: the plain evaluation of those weights with its head
    base = evaluate(enc, None, heads, {"gratings": test["gratings"]})["gratings"]
    assert rows["base"]["per_task"]["gratings"] == pytest.approx(base)
    ta = {n: p.detach() + 0.3 * tau.sum(0) for n, p, tau in
          ((n, dict(enc.named_parameters())[n], t) for n, t in zip(loaded.task_vectors.names,
                                                                    loaded.task_vectors.tensors))}
    want = evaluate(enc, ta, heads, {"gratings": test["gratings"]})["gratings"]
    assert rows["task_arithmetic"]["per_task"]["gratings"] == pytest.approx(want)
    for name, row in rows.items():  # averages over the merged tasks, the unseen one apart
        seen = [row["per_task"][t] for t in ("digits", "shapes")]
        assert row["avg"] == pytest.approx(sum(seen) / 2), name
        if name != "individual":
            assert row["avg_unseen"] == pytest.approx(row["per_task"]["gratings"]), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["unseen_tasks"] == ["gratings"]
    md = (tmp_path / "results.md").read_text()
    assert "| gratings* |" in md and "unseen avg" in md and "unseen task" in md
    assert "| individual |" in md and " | - |" in md
    assert "gratings*" in terminal_table(res)
    assert markdown_table({"tasks": ["a"], "methods": {"m": {"per_task": {"a": 1.0}, "avg": 1.0}}}).count("*") == 4


def test_lightning_eval_covers_unseen_and_adapts_on_merged_only(loaded, tmp_path):
    model = AdaMerging(PreloadedPool(loaded), granularity="taskwise")
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=4, eval_batch_size=256, max_eval_samples=64)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["digits", "shapes"]  # no adaptation batch of the unseen task
    assert model.merged.coefficients.shape == (1, 2)
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert {"test/acc/digits", "test/acc/shapes", "test/acc/gratings", "test/acc_avg_unseen"} <= set(metrics)
    assert metrics["test/acc_avg"] == pytest.approx((metrics["test/acc/digits"] + metrics["test/acc/shapes"]) / 2)
    assert metrics["test/acc_avg_unseen"] == pytest.approx(metrics["test/acc/gratings"])
    sets = {"gratings": torch.utils.data.Subset(dm.eval_dataset("gratings"), range(64))}
    assert model.accuracies(sets)["gratings"] == pytest.approx(metrics["test/acc/gratings"])


def test_methods_with_per_task_modules_keep_the_frozen_head_of_an_unseen_task(loaded):
    model = Tinting(PreloadedPool(loaded), loss="entropy")
    assert sorted(model.task_modules) == ["digits", "shapes"]
    assert model.task_head("gratings") is model.heads["gratings"]
    assert sorted(model.export_heads()) == ["digits", "gratings", "shapes"]
