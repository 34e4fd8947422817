"""Bad input fails early with one line and no output; writes are atomic; checkpoints match their pool.

The CLI cases call ``adamerge.commands.main.main`` in-process (the same code path as the ``adamerge``
command, without paying a Python start-up per case); the subprocess cases (SIGKILL, DDP) are in
``test_resume_ddp.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.methods.checkpoint_guard import COEFFICIENTS_KEY, check_checkpoint
from adamerge.io.run_checkpoint import AtomicCheckpointIO, RunCheckpoint
from adamerge.io.checkpoints import atomic_write, read_checkpoint, save_state_dict, write_json_atomic
from adamerge.commands.main import main
from adamerge.data.datamodule import AdaptationStream, ImageFolderDataset, label_count
from adamerge.errors import suggest, unknown_name
from adamerge.suites.synthetic import SuiteSource, TinyViT
from conftest import RandomPool, perturbed

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(image_size=8, patch=4, channels=3, dim=16, depth=1, heads=2, out_dim=16)


# ------------------------------------------------------------------------- a small project
def write_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def make_project(tmp: Path, tasks=("a", "b"), classes=2, images=4) -> Path:
    """weights/ (base, experts, heads), data/<task>/test/<class>/*.png, configs/run.yaml (relative paths)."""
    torch.manual_seed(0)
    enc = TinyViT(**ARCH)
    save_state_dict(enc.state_dict(), tmp / "weights/base.safetensors")
    for i, t in enumerate(tasks):
        save_state_dict(perturbed(enc, 0.05, i + 1), tmp / f"weights/{t}.safetensors")
    save_state_dict({f"{t}.weight": torch.randn(classes, 16) * 5 for t in tasks}, tmp / "weights/heads.safetensors")
    for i, t in enumerate(tasks):
        for c in range(classes):
            write_images(tmp / f"data/{t}/test/c{c}", images, seed=10 * i + c)
    config = {
        "seed_everything": 0,
        "model": {"pool": {"class_path": "adamerge.models.CheckpointPool", "init_args": {
            "model": {"class_path": "adamerge.suites.TinyViT", "init_args": ARCH},
            "base": "../weights/base.safetensors",
            "experts": {t: f"../weights/{t}.safetensors" for t in tasks},
            "heads": "../weights/heads.safetensors"}}},
        "data": {"source": {"class_path": "adamerge.data.FolderSource",
                            "init_args": {"root": "../data", "image_size": 8}},
                 "batch_size": 2, "eval_batch_size": 8},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "val_check_interval": 1000,
                    "check_val_every_n_epoch": None},
        "checkpoint": {"every_n_train_steps": 1},
    }
    (tmp / "configs").mkdir(exist_ok=True)
    (tmp / "configs/run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp / "configs/run.yaml"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    from adamerge.io.checkpoints import load_state_dict
    return load_state_dict(path)


def cli(capsys, command: str, cfg: Path, out: Path, *extra: str) -> tuple[int, str]:
    """Run ``adamerge COMMAND --config cfg`` in-process from the repository root; (exit code, stderr)."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # not the config's folder: relative paths must resolve against the config
    try:
        code = main([command, "--config", str(cfg), "--trainer.default_root_dir", str(out), *extra])
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out: Path, *fragments: str) -> None:
    """Exit 1, one ``adamerge ...: error:`` line naming the problem, no traceback, nothing half-written."""
    lines = [ln for ln in err.splitlines() if ln.startswith("adamerge ")]
    assert code == 1, err[-2000:]
    assert len(lines) == 1 and ": error: " in lines[0], err[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in err
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir()), sorted(ckpts.iterdir())
    assert not out.exists() or not list(out.rglob("*.tmp"))


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")


def test_project_runs_with_paths_relative_to_config(project, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli(capsys, "fit", project, out)
    assert code == 0, err[-3000:]
    assert read_checkpoint(out / "checkpoints/last.ckpt")["global_step"] == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the run's copy of the config
    base = saved["model"]["pool"]["init_args"]["base"]
    assert base == str((project.parent.parent / "weights/base.safetensors").resolve()), base
    assert saved["data"]["source"]["init_args"]["root"] == str((project.parent.parent / "data").resolve())


# ------------------------------------------------------------------------------ bad input
def test_missing_file(project, tmp_path, capsys):
    (project.parent.parent / "weights/b.safetensors").unlink()
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, "fit", project, out), out, "model.pool.experts", "does not exist",
                         "b.safetensors")


def test_corrupt_weight_file(project, tmp_path, capsys):
    (project.parent.parent / "weights/base.safetensors").write_bytes(b"\x00garbage" * 10)
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, "fit", project, out), out, "base.safetensors: cannot read checkpoint")


def test_architecture_mismatch(project, tmp_path, capsys):
    wider = TinyViT(**{**ARCH, "dim": 24, "out_dim": 16})
    save_state_dict(wider.state_dict(), project.parent.parent / "weights/b.safetensors")
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, "fit", project, out), out, "fine-tuned model 'b' does not match base",
                         "expected (16,")


def test_extra_and_missing_keys(project, tmp_path, capsys):
    path = project.parent.parent / "weights/a.safetensors"
    state = dict(read_state(path))
    del state["cls"]
    state["adapter.weight"] = torch.zeros(2, 2)
    save_state_dict(state, path)
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, "fit", project, out), out, "missing keys [cls]",
                         "unexpected keys [adapter.weight]")


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_head_class_count_checked_before_any_step(project, tmp_path, capsys, command):
    # 3 class folders, 2-way heads; no evaluation would run in this fit (val_check_interval 1000,
    # no sanity check), so only the up-front check can catch it.
    write_images(project.parent.parent / "data/b/test/c2", 4, seed=99)
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, command, project, out), out,
                         "task 'b': the 'test' split has 3 classes but the head has 2 outputs")


def test_empty_dataset(project, tmp_path, capsys):
    for f in (project.parent.parent / "data/a/test").rglob("*.png"):
        f.unlink()
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, "fit", project, out), out, "a/test: no images in its 2 class folders")


def test_undecodable_image_fails_or_is_skipped(project, tmp_path, capsys):
    bad = project.parent.parent / "data/a/test/c1/broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    out = tmp_path / "fail"
    # every image of the split is read by evaluation: validate reaches the broken one for sure
    assert_clean_failure(*cli(capsys, "validate", project, out), out, "broken.png: cannot decode image",
                         "on_decode_error: skip")
    with pytest.warns(UserWarning, match=r"skipped 1 undecodable image\(s\) in .*c1/broken.png"):
        code, err = cli(capsys, "validate", project, tmp_path / "skip",
                        "--data.source.init_args.on_decode_error", "skip")
    assert code == 0, err[-3000:]


def test_folder_dataset_skip_keeps_length_and_counts(tmp_path):
    write_images(tmp_path / "x", 3, seed=0)
    (tmp_path / "x/9.png").write_bytes(b"not an image")
    (tmp_path / "x/8.png").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path, 8, on_decode_error="skip")
    assert len(ds) == 5 and ds.classes == ["x"]
    with pytest.warns(UserWarning, match="skipped"):
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    assert sorted(Path(p).name for p in ds.skipped) == ["8.png", "9.png"]
    with pytest.raises(ValueError, match="9.png: cannot decode image"):
        ImageFolderDataset(tmp_path, 8)[4]


def test_unknown_task_names_suggest_the_nearest(project, tmp_path, capsys):
    out = tmp_path / "run"
    assert_clean_failure(*cli(capsys, "fit", project, out, "--data.source.init_args.tasks", "[a, bb]"), out,
                         "unknown task 'bb'", "did you mean 'b'?")
    # the pool names a task the data does not have
    cfg = yaml.safe_load(project.read_text())
    cfg["model"]["pool"]["init_args"]["experts"] = {"A": "../weights/a.safetensors",
                                                    "b": "../weights/b.safetensors"}
    heads = read_state(project.parent.parent / "weights/heads.safetensors")
    save_state_dict({"A.weight": heads["a.weight"], "b.weight": heads["b.weight"]},
                    project.parent.parent / "weights/heads.safetensors")
    project.write_text(yaml.safe_dump(cfg))
    assert_clean_failure(*cli(capsys, "fit", project, out), out, "no data for tasks ['A']",
                         "did you mean 'A' -> 'a'?")


def test_unknown_suite_task_and_suite_suggest(tmp_path):
    from adamerge.suites.synthetic import SuitePool
    with pytest.raises(ValueError, match=r"unknown task 'digts' in suite 'tiny'; did you mean 'digits'\?"):
        SuitePool("tiny", tasks=["digts"])
    with pytest.raises(ValueError, match=r"unknown suite 'tinny'; did you mean 'tiny'\?"):
        SuiteSource("tinny")
    with pytest.raises(ValueError, match=r"did you mean 'shapes'"):
        SuiteSource("tiny", tasks=["shape"])


def test_suggest():
    assert suggest("digts", ["digits", "shapes"]) == "digits"
    assert suggest("MNIST", ["mnist", "svhn"]) == "mnist"
    assert suggest("zzz", ["digits", "shapes"]) is None
    msg = unknown_name("task", "svnh", ["mnist", "svhn"])
    assert msg == "unknown task 'svnh'; did you mean 'svhn'? (known: mnist, svhn)"


def test_label_count():
    from torch.utils.data import Subset, TensorDataset
    ds = TensorDataset(torch.zeros(4, 1), torch.tensor([0, 3, 1, 1]))
    assert label_count(ds) == (4, False)
    assert label_count(Subset(ds, [0, 2])) == (2, False)
    assert label_count(TensorDataset(torch.zeros(2, 1))) is None

    class Declared:
        classes = ["x", "y", "z"]
    assert label_count(Declared()) == (3, True)


# ------------------------------------------------------------------------ NaN loss mid-run
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    source = SuiteSource("tiny")
    n = len(source.dataset("digits", "test"))
    poisoned = AdaptationStream({"digits": range(n)}, batch_size=16, seed=0).indices(0, n, 7)[0]
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["data"]["source"] = {"class_path": "faulty_data.PoisonedSuiteSource",
                             "init_args": {"suite": "tiny", "task": "digits", "index": poisoned}}
    cfg["trainer"].update(max_steps=20, logger=False, enable_progress_bar=False, num_sanity_val_steps=0)
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    code, err = cli(capsys, "fit", tmp_path / "nan.yaml", out)
    line = [ln for ln in err.splitlines() if ln.startswith("adamerge ")]
    assert code == 1 and len(line) == 1, err[-3000:]
    assert "non-finite entropy nan at step 7" in line[0] and "last good checkpoint is kept" in line[0]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["epoch=0-step=5.ckpt", "last.ckpt"], saved
    for p in (out / "checkpoints").iterdir():
        assert torch.isfinite(read_checkpoint(p)["state_dict"][COEFFICIENTS_KEY]).all()
    assert read_checkpoint(out / "checkpoints/last.ckpt")["global_step"] == 5


def test_non_finite_coefficients_are_never_saved_and_bad_gradients_stop():
    model = AdaMerging(RandomPool())
    with torch.no_grad():
        model.merged.coefficients[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to save non-finite coefficients"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})
    model.merged.coefficients.grad = torch.full_like(model.merged.coefficients, math.inf)
    with pytest.raises(FloatingPointError, match="non-finite coefficient gradient"):
        model.on_before_optimizer_step(None)


# ---------------------------------------------------------------------- unpickling / YAML
def test_resume_from_corrupt_or_pickled_checkpoint_is_refused(project, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/last.ckpt").write_bytes(b"PK\x03\x04 truncated zip")
    code, err = cli(capsys, "fit", project, out, "--ckpt_path", "last")
    line = [ln for ln in err.splitlines() if ln.startswith("adamerge ")]
    assert code == 1 and "last.ckpt: cannot read checkpoint" in line[0], err[-2000:]
    # a checkpoint carrying a pickled callable is refused without running it
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"state_dict": {}, "payload": Payload()}, out / "checkpoints/last.ckpt")
    code, err = cli(capsys, "validate", project, out, "--ckpt_path", str(out / "checkpoints/last.ckpt"))
    line = [ln for ln in err.splitlines() if ln.startswith("adamerge ")]
    assert code == 1 and "pickled objects" in line[0], err[-2000:]
    assert not marker.exists()


def test_config_content_is_not_executed(project, tmp_path, capsys):
    marker = tmp_path / "pwned"
    text = project.read_text().replace("seed_everything: 0",
                                       f"seed_everything: !!python/object/apply:os.system ['touch {marker}']")
    project.write_text(text)
    code, err = cli(capsys, "fit", project, tmp_path / "run")
    assert code == 1 and "adamerge fit: error:" in err
    assert not marker.exists()


# --------------------------------------------------------------------------- fingerprints
def trained_checkpoint(tmp_path, pool, granularity="layerwise") -> Path:
    model = AdaMerging(pool, granularity=granularity)
    from test_adamerging import random_data, trainer
    trainer(tmp_path, 2, [RunCheckpoint(every_n_train_steps=2, save_last=True)]).fit(
        model, MultiTaskDataModule(random_data(), batch_size=4))
    return tmp_path / "checkpoints/last.ckpt"


def test_checkpoint_refused_on_other_pool_naming_the_difference(tmp_path):
    path = trained_checkpoint(tmp_path, RandomPool())
    ckpt = read_checkpoint(path)
    same = AdaMerging(RandomPool())
    check_checkpoint(ckpt, same.fingerprint, tuple(same.merged.coefficients.shape))
    before = same.merged.coefficients.detach().clone()
    same.load_coefficients(path)
    assert not torch.equal(before, same.merged.coefficients)
    cases = {
        "task order": (RandomPool(tasks=("b", "a", "c")), "tasks ['a', 'b', 'c'] (checkpoint) vs ['b', 'a', 'c'] (now)"),
        "other files": (RandomPool(seed=3), "weights differ for tasks"),
    }
    for what, (pool, fragment) in cases.items():
        model = AdaMerging(pool)
        with pytest.raises(ValueError, match="different model pool") as info:
            model.load_coefficients(path)
        assert fragment in str(info.value), (what, str(info.value))
        assert str(path) in str(info.value)
    taskwise = AdaMerging(RandomPool(), granularity="taskwise")
    with pytest.raises(ValueError, match=r"layerwise coefficients of shape \(\d+, 3\), this run expects \(1, 3\)"):
        taskwise.load_coefficients(path)
    fp = dict(same.fingerprint)
    fp["params"] = {**fp["params"], "proj.weight": [16, 8]}
    with pytest.raises(ValueError, match=r"parameter 'proj.weight': shape \[16, 16\] \(checkpoint\) vs \[16, 8\]"):
        check_checkpoint(ckpt, fp, tuple(same.merged.coefficients.shape), source=str(path))
    with pytest.raises(ValueError, match="not an adamerge (run )?checkpoint"):
        check_checkpoint({"state_dict": {}}, fp, (1, 3))


def test_validate_refuses_checkpoint_of_other_pool(project, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(capsys, "fit", project, out)[0] == 0
    last = out / "checkpoints/last.ckpt"
    cfg = yaml.safe_load(project.read_text())
    experts = cfg["model"]["pool"]["init_args"]["experts"]
    cfg["model"]["pool"]["init_args"]["experts"] = {"b": experts["b"], "a": experts["a"]}
    (project.parent / "swapped.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, err = cli(capsys, "validate", project.parent / "swapped.yaml", tmp_path / "v", "--ckpt_path", str(last))
    line = [ln for ln in err.splitlines() if ln.startswith("adamerge ")]
    assert code == 1 and "different model pool: tasks ['a', 'b'] (checkpoint) vs ['b', 'a'] (now)" in line[0], err[-2000:]


# ------------------------------------------------------------------------------ atomicity
def test_failed_checkpoint_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints/last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4, "x": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):  # dies half-way through writing
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr("adamerge.io.run_checkpoint.torch.save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6}, path)
    assert read_checkpoint(path)["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_sigkill_during_atomic_write_never_exposes_a_prefix(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old complete file")
    script = (f"import sys, time\nfrom adamerge.io.checkpoints import atomic_write\n"
              f"with atomic_write({str(target)!r}) as tmp:\n"
              f"    f = open(tmp, 'wb'); f.write(b'new partial'); f.flush()\n"
              f"    print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert target.read_bytes() == b"old complete file"
    strays = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(strays) == 1 and strays[0].startswith(".last.ckpt.") and strays[0].endswith(".tmp")
    # Lightning's `--ckpt_path last` only considers last*.ckpt files
    assert not RunCheckpoint(dirpath=str(tmp_path))._find_last_checkpoints(L.Trainer(logger=False)) - {str(target)}


def test_trainer_checkpoints_go_through_atomic_io(tmp_path):
    from test_adamerging import random_data, trainer
    t = trainer(tmp_path, 2, [RunCheckpoint(every_n_train_steps=1, save_last=True)])
    t.fit(AdaMerging(RandomPool()), MultiTaskDataModule(random_data(), batch_size=4))
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    assert oct((tmp_path / "checkpoints/last.ckpt").stat().st_mode & 0o777) == oct(0o644)


def test_write_json_atomic(tmp_path):
    path = tmp_path / "out/results.json"
    write_json_atomic({"acc": {"a": 91.5}}, path)
    assert json.loads(path.read_text()) == {"acc": {"a": 91.5}}
    with pytest.raises(ValueError, match="results.json: cannot write as JSON"):
        write_json_atomic({"acc": float("nan")}, path)
    with pytest.raises(ValueError, match="cannot write as JSON"):
        write_json_atomic({"x": object()}, path)
    assert json.loads(path.read_text()) == {"acc": {"a": 91.5}}  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"acc": {"a": 91.5}}


def test_last_checkpoint_is_the_final_step_when_max_steps_is_not_a_multiple(tmp_path):
    """Lightning keeps the last *periodic* last.ckpt unless told; RunCheckpoint saves the end."""
    from pathlib import Path
    from adamerge.commands.main import main
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "7",
                 "--trainer.val_check_interval", "7", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger", "false"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert (tmp_path / "checkpoints" / "epoch=0-step=5.ckpt").is_file()
