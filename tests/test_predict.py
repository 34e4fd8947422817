"""``adamerge predict``: one task's images through a checkpoint's merged model."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.commands.main import main
from adamerge.commands.predict import ImageFiles
from adamerge.io.checkpoints import read_checkpoint
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")


def rows_of(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_csv_accuracy_equals_test_accuracy_and_other_pools_are_refused(tmp_path, capsys):
    model = AdaMerging(PreloadedPool(SuitePool("tiny").load()), lr=1e-2)
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16, eval_batch_size=256)
    tr = trainer(tmp_path, 15)
    tr.fit(model, dm)
    ckpt = tmp_path / "run.ckpt"
    tr.save_checkpoint(ckpt)
    expected = model.accuracies({"shapes": dm.dataset("shapes", "test")})["shapes"]
    out = tmp_path / "pred.csv"
    assert main(["predict", "--config", TINY, "--ckpt_path", str(ckpt), "--task", "shapes",
                 "--split", "test", "--out", str(out), "--no-progress"]) == 0
    rows = rows_of(out)
    assert len(rows) == len(dm.dataset("shapes", "test"))
    acc = 100.0 * sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert abs(acc - expected) < 1e-9
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    # a checkpoint of another pool is refused in one line
    other = tmp_path / "other.ckpt"
    ck = read_checkpoint(ckpt)
    ck["adamerge"]["fingerprint"]["hash"] = "0" * 16
    torch.save(ck, other)
    capsys.readouterr()
    assert main(["predict", "--config", TINY, "--ckpt_path", str(other), "--task", "shapes",
                 "--split", "test", "--out", str(tmp_path / "x.csv"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "different model pool" in err and not (tmp_path / "x.csv").exists()
    assert main(["predict", "--config", TINY, "--task", "nope", "--split", "test",
                 "--out", str(tmp_path / "y.csv"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err or ("task" in err and "nope" in err), err


def test_predict_reads_a_folder_of_images(tmp_path):
    ds = SuiteSource("tiny").dataset("digits", "test")
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        arr = (ds[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    out = tmp_path / "pred.csv"
    # no --image-size: the suite's data source knows its image size
    res = subprocess.run([sys.executable, "-m", "adamerge", "predict", "--config", TINY, "--task", "digits",
                          "--images", str(folder), "--out", str(out),
                          "--no-progress"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = rows_of(out)
    assert [Path(r["file"]).name for r in rows] == ["0.png", "2.png", "4.png", "1.png", "3.png"]
    assert all(r["label"] == "" and r["prediction"].isdigit() for r in rows)


def test_predict_from_an_export_folder_needs_no_pool_file(tmp_path, monkeypatch):
    """Export (with an unseen task), then predict from the folder alone: same logits as the module."""
    from adamerge.io.export import export
    from adamerge.exported import ExportedModel
    loaded = SuitePool("tiny", unseen_tasks=["gratings"]).load()
    model = AdaMerging(PreloadedPool(loaded), lr=1e-2)
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16)
    tr = trainer(tmp_path, 3)
    tr.fit(model, dm)
    tr.save_checkpoint(tmp_path / "run.ckpt")
    export(model, tmp_path / "run.ckpt", tmp_path / "export")
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "empty"))  # the suite's files are out of reach
    exported = ExportedModel.from_folder(tmp_path / "export")
    assert exported.tasks == ["digits", "shapes", "gratings"] and exported.unseen_tasks == ["gratings"]
    x = torch.stack([dm.dataset("gratings", "test")[i][0] for i in range(8)])
    params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
    for task in ("shapes", "gratings"):
        torch.testing.assert_close(exported(x, task), model.task_logits({task: x}, params)[task],
                                   rtol=1e-5, atol=1e-5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        arr = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(folder / f"{i}.png")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--export", str(tmp_path / "export"), "--task", "gratings", "--images",
                 str(folder), "--out", str(out), "--no-progress"]) == 0
    rows = rows_of(out)
    ref = ImageFiles(folder, x.shape[-1], x.shape[1])  # the folder's images as predict reads them
    want = exported(torch.stack([ref[i] for i in range(4)]), "gratings").argmax(-1)
    assert [int(r["prediction"]) for r in rows] == want.tolist()
    assert not list(Path(tmp_path / "empty").glob("**/*.safetensors"))  # nothing was rebuilt
    assert main(["predict", "--export", str(tmp_path / "export"), "--task", "gratings", "--split", "test",
                 "--out", str(tmp_path / "x.csv"), "--no-progress"]) == 1
