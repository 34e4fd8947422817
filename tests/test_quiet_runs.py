"""The first hour: quiet runs, the coefficients in TensorBoard, the per-task table after test.

One tiny ``adamerge fit`` subprocess (module-scoped) serves the stderr, TensorBoard and heatmap
checks and gives the checkpoint that ``test`` / ``validate`` read in-process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adamerge.commands.main import main, pop_verbose
from adamerge.report import CoefficientHeatmap

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# what Lightning printed on every run before: the args warning, the eval-mode warning (the frozen
# base is in eval mode on purpose), its logger / model-registry tips, torch's LeafSpec deprecation
NOISE = ("args parameter is intended", "in eval mode at the start of training", "Tip:", "litlogger",
         "litmodels", "LeafSpec", "The dirpath has changed")


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ADAMERGE_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "adamerge", "fit", "--config", TINY, "--trainer.default_root_dir", str(root),
         "--trainer.max_steps", "10", "--trainer.val_check_interval", "5", "--trainer.enable_progress_bar",
         "false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(root=root, stderr=proc.stderr, stdout=proc.stdout,
                           log_dir=root / "lightning_logs" / "version_0",
                           last=root / "checkpoints" / "last.ckpt")


def test_fit_prints_no_warnings(tiny_fit):
    lines = (tiny_fit.stderr + tiny_fit.stdout).splitlines()
    assert not [ln for ln in lines if re.search(r"warn", ln, re.I)], tiny_fit.stderr
    assert not [ln for ln in lines if any(n in ln for n in NOISE)], tiny_fit.stderr
    assert "GPU available" in tiny_fit.stderr  # Lightning's own info lines stay
    assert "Trainer.fit` stopped" not in tiny_fit.stderr  # but the stop line: the summary says it
    summary = [ln for ln in tiny_fit.stdout.splitlines() if ln.startswith("adamerge fit: ")]
    assert len(summary) == 1, tiny_fit.stdout[-2000:]  # one line: what was reached and where it is
    for part in ("10 steps", "val/acc_avg", "checkpoint ", "last.ckpt", "TensorBoard ", "heatmap ", "coefficients.png"):
        assert part in summary[0], (part, summary[0])


def test_resume_counts_steps_and_continues_the_tensorboard_version(tmp_path, capsys):
    """The bar reads ``fit N/max_steps`` (not ``Epoch 0/-2``), a resumed run starts it at the
    checkpoint's step, and its curves go on in the same TensorBoard version."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root = tmp_path / "run"
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.val_check_interval",
            "100", "--trainer.log_every_n_steps", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--trainer.max_steps", "3"]) == 0
        first = capsys.readouterr()
        assert main([*args, "--trainer.max_steps", "5", "--ckpt_path", "last"]) == 0
        second = capsys.readouterr()
    for out in (first, second):
        text = (out.out + out.err).replace("\r", "\n")
        assert "Epoch 0/-2" not in text and "v_num" not in text, text[-1500:]
    counts = lambda out: [tuple(map(int, m)) for m in re.findall(r"^fit: .*?\b(\d+)/(\d+) ", out.replace("\r", "\n"),
                                                                      re.M)]
    assert counts(first.out + first.err)[-1] == (3, 3)
    resumed = counts(second.out + second.err)
    assert resumed[0][0] >= 3 and resumed[-1] == (5, 5), resumed  # starts at the checkpoint's step
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    assert "TensorBoard " + str(root / "lightning_logs" / "version_0") in second.out
    acc = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = sorted({e.step for e in acc.Scalars("train/entropy")})
    assert steps[0] <= 2 and steps[-1] >= 4, steps  # both runs' curves, one version


def test_fit_logs_coefficients_to_tensorboard(tiny_fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list(tiny_fit.log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "coefficients" in tags["images"]
    assert [e.step for e in acc.Images("coefficients")] == [5, 10]  # each validation (the end: no repeat)
    assert {f"coefficients/{t}" for t in ("digits", "shapes", "gratings")} <= set(tags["histograms"])
    hp = acc.Scalars("hp_metric")  # hparams tab: -1 at the start, the final val/acc_avg at the end
    final = acc.Scalars("val/acc_avg")[-1]
    assert hp[-1].step == 10 and hp[-1].value == pytest.approx(final.value)
    png = tiny_fit.log_dir / "coefficients.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _eval(command, tiny_fit, out, capsys, caplog, *extra):
    """Run ``command`` in-process; (captured output, warning messages, log messages)."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        code = main([command, "--config", TINY, "--ckpt_path", str(tiny_fit.last),
                     "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured, [str(w.message) for w in caught], [r.getMessage() for r in caplog.records]


def test_test_prints_the_table_and_writes_results(tiny_fit, tmp_path, capsys, caplog):
    out = tmp_path / "test"
    captured, caught, logged = _eval("test", tiny_fit, out, capsys, caplog)
    # no warnings even in-process (sys.argv is pytest's: LightningCLI warned about args and argv)
    assert not [m for m in caught + logged if any(n in m for n in NOISE)], caught + logged
    stdout = captured.out
    assert "Test metric" not in stdout and "DataLoader" not in stdout  # Lightning's box is gone
    header = next(ln for ln in stdout.splitlines() if "digits" in ln)
    assert header.split() == ["digits", "shapes", "gratings", "avg", "norm"]
    assert re.search(r"^adamerging_layerwise\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+", stdout, re.M)
    results_path = out / "lightning_logs" / "version_0" / "results.json"
    assert f"wrote {results_path}" in stdout
    results = json.loads(results_path.read_text())
    assert (out / "lightning_logs" / "version_0" / "results.md").read_text().startswith("| method |")
    # the schema of the demo's results.json (report.build_results, as compare writes it)
    assert list(results) == ["suite", "tasks", "methods", "descriptions", "hparams", "tuned", "settings",
                             "seconds", "commit"]
    assert results["tasks"] == ["digits", "shapes", "gratings"]
    row = results["methods"]["adamerging_layerwise"]
    assert list(row) == ["per_task", "avg", "normalized_avg"]
    assert list(row["per_task"]) == ["digits", "shapes", "gratings"]
    assert row["avg"] == pytest.approx(sum(row["per_task"].values()) / 3)
    assert set(results["settings"]) >= {"steps", "val_split", "seed", "batch_size", "adapt_split", "eval_split"}
    assert results["settings"]["steps"] == 10 and results["settings"]["ckpt_path"] == str(tiny_fit.last)
    assert results["hparams"]["adamerging_layerwise"]["granularity"] == "layerwise"
    assert "test/acc_avg" in stdout


def test_validate_with_verbose_keeps_lightnings_box(tiny_fit, tmp_path, capsys, caplog):
    captured, caught, logged = _eval("validate", tiny_fit, tmp_path / "val", capsys, caplog, "--verbose")
    assert "Validate metric" in captured.out  # Lightning's box is back
    assert "adamerging_layerwise" in captured.out and "val/acc_avg" in captured.out  # with the table
    assert any("litlogger" in m for m in logged)  # and Lightning's tip
    assert os.environ.get("ADAMERGE_VERBOSE") is None  # --verbose applied to that command only
    assert (tmp_path / "val" / "lightning_logs" / "version_0" / "results.json").is_file()


def test_results_of_unseen_tasks_are_marked(tiny_fit, tmp_path):
    from adamerge.commands.fit import eval_results
    model = SimpleNamespace(task_names=["digits", "shapes"], unseen_tasks=["gratings"],
                            hparams={"granularity": "layerwise", "_class_path": "x", "path": Path("p")},
                            method="adamerging")
    cli = SimpleNamespace(model=model, datamodule=None, subcommand="test", _ckpt_step=None,
                          config={"test": {"ckpt_path": None, "config": [], "seed_everything": 0}})
    results = eval_results(cli, {"digits": 50.0, "shapes": 70.0, "gratings": 20.0}, 1.0)
    assert results["unseen_tasks"] == ["gratings"]
    row = results["methods"]["adamerging"]  # model is no registry class: its method name
    assert row["avg"] == 60.0 and row["avg_unseen"] == 20.0
    assert results["hparams"]["adamerging"] == {"granularity": "layerwise", "path": "p"}


def test_heatmap_callback_without_coefficients_or_logger(tmp_path):
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], log_dir=None, default_root_dir=str(tmp_path),
                              global_step=3, callback_metrics={"val/acc_avg": torch.tensor(50.0)},
                              state=SimpleNamespace(fn="fit"), sanity_checking=False)
    cb = CoefficientHeatmap()
    cb.on_validation_end(trainer, nn.Linear(2, 2))  # a module without `merged`: nothing to do
    cb.on_train_end(trainer, nn.Linear(2, 2))
    assert not list(tmp_path.iterdir())

    class Merged(nn.Module):
        task_names = ["a", "b"]

        def lambdas(self):
            return torch.full((1, 2), 0.3)

    module = nn.Module()
    module.merged = Merged()
    cb.on_train_end(trainer, module)  # no logger: the PNG only, in default_root_dir
    assert (tmp_path / "coefficients.png").is_file()


def test_pop_verbose():
    assert pop_verbose(["--config", "x", "--verbose"]) == (["--config", "x"], True)
    assert pop_verbose(["--verbose", "false", "--a", "1"]) == (["--a", "1"], False)
    assert pop_verbose(["--verbose=true"]) == ([], True)
    assert pop_verbose(["--a"]) == (["--a"], None)


def test_test_of_a_run_checkpoint_writes_into_that_run(tiny_fit, tmp_path, monkeypatch, capsys):
    """Without --trainer.default_root_dir, `test --ckpt_path RUN/checkpoints/X.ckpt` writes its
    results and logs into RUN, not into the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["test", "--config", TINY, "--ckpt_path", str(tiny_fit.last),
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert list(tmp_path.iterdir()) == []
    found = sorted(tiny_fit.root.glob("lightning_logs/version_*/results.json"))
    assert found and f"wrote {found[-1]}" in capsys.readouterr().out


def test_heatmap_colours_span_the_learned_range():
    """A short run moves the coefficients a little around the prior: the colour scale follows
    them, not a fixed 0-1 range (issue 29, item 9)."""
    import matplotlib.pyplot as plt
    import torch
    from adamerge.report import coefficient_figure
    lam = torch.tensor([[0.29, 0.31], [0.30, 0.33]])
    fig = coefficient_figure(lam, ["a.weight", "b.weight"], ["x", "y"])
    image = fig.axes[0].images[0]
    assert image.norm.vmin == pytest.approx(0.29) and image.norm.vmax == pytest.approx(0.33)
    plt.close(fig)
    flat = coefficient_figure(torch.full((2, 2), 0.3), ["a", "b"], ["x", "y"])  # no range: a small one
    assert flat.axes[0].images[0].norm.vmin < 0.3 < flat.axes[0].images[0].norm.vmax
    plt.close(flat)
