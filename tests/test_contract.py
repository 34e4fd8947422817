"""The contract matrix: every registered method through every path it declares.

In the manner of peft's ``tests/test_custom_models.py`` (one list of cases run through every
generic test): the cases are the registry itself, so a new row enters the matrix by being
registered and no test lists method names. On the tiny suite, each learned row goes through fit
from its config (written from its registry defaults, as ``scripts/make_clip_configs.py`` writes
the CLIP ones), resume, test (``results.json`` names the row), export, ``ExportedModel`` (logits
equal to the module's), ``predict --export``, ``online`` and ``compare --config``; each static,
fitted and per-task row goes through compare, export and predict. Where a method cannot take a
path it says so (``refusal`` of the module, or the kind), and the CLI must refuse it in one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from adamerge.commands.export import build_from_config
from adamerge.commands.main import main
from adamerge.exported import ExportedModel
from adamerge.io.checkpoints import read_checkpoint
from adamerge.methods import registry

ROOT = Path(__file__).resolve().parents[1]
SUITE = {"class_path": "adamerge.suites.SuitePool", "init_args": {"suite": "tiny"}}
SOURCE = {"class_path": "adamerge.suites.SuiteSource", "init_args": {"suite": "tiny"}}
STEPS = 4  # a straight run; resume starts from its checkpoint at STEPS // 2


def write_config(name: str, folder: Path, init_from: str | None = None) -> Path:
    """A tiny-suite config of registry row ``name``: its class and every default written out."""
    method = registry.get(name)
    args = {"pool": SUITE, **{k: v for k, v in method.defaults().items() if v is not None}}
    if method.starts_from:
        args["init_from"] = init_from
    model = {"class_path": f"{method.build.__module__}.{method.build.__name__}", "init_args": args}
    cfg = {"seed_everything": 0, "model": model,
           "data": {"source": SOURCE, "batch_size": 8, "eval_batch_size": 256, "adapt_split": "test",
                    "eval_split": "test", **dict(method.data)},
           "trainer": {"max_steps": STEPS, "limit_val_batches": 0, "check_val_every_n_epoch": None,
                       "log_every_n_steps": 1, "accelerator": "cpu", "devices": 1, "logger": False,
                       "enable_model_summary": False, "enable_progress_bar": False},
           "checkpoint": {"every_n_train_steps": STEPS // 2, "save_last": True, "save_top_k": -1}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    """``adamerge ARGS`` in process: exit code and what it wrote to stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def refused(capsys, reason: str, *args: str) -> None:
    """The CLI refuses the run with exit code 1 and one line that gives ``reason``."""
    code, err = cli(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and reason.split(":")[0] in lines[0], err


def learned(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(ckpt)["state_dict"]


def image_folder(dataset, folder: Path, n: int = 4) -> torch.Tensor:
    """``n`` images of ``dataset`` written as PNG files; returns them as tensors."""
    folder.mkdir(parents=True)
    xs = torch.stack([dataset[i][0] for i in range(n)])
    for i in range(n):
        arr = (xs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(folder / f"{i}.png")
    return xs


def check_predict_from_export(capsys, export_dir: Path, task: str, dataset, tmp: Path) -> None:
    """``predict --export`` answers what ``ExportedModel`` answers on the same files."""
    from adamerge.commands.predict import ImageFiles
    xs = image_folder(dataset, tmp / "images")
    out = tmp / "pred.csv"
    code, err = cli(capsys, "predict", "--export", export_dir, "--task", task, "--images", tmp / "images",
                    "--out", out, "--no-progress")
    assert code == 0, err
    with open(out) as f:
        rows = list(csv.DictReader(f))
    exported = ExportedModel.from_folder(export_dir)
    read = ImageFiles(tmp / "images", xs.shape[-1], xs.shape[1])
    want = exported(torch.stack([read[i] for i in range(len(read))]), task).argmax(-1)
    assert [int(r["prediction"]) for r in rows] == want.tolist()


@pytest.fixture(scope="module")
def prerequisites(tmp_path_factory) -> dict[str, Path]:
    """Finished short runs of the rows others start from (``starts_from``), by row name."""
    out = {}
    for name in {m.starts_from for m in registry.REGISTRY.values() if m.starts_from}:
        folder = tmp_path_factory.mktemp(f"first-{name}")
        assert main(["fit", "--config", str(write_config(name, folder)), "--trainer.max_steps", "2",
                     "--trainer.default_root_dir", str(folder / "run")]) == 0
        out[name] = folder / "run" / "checkpoints" / "last.ckpt"
    return out


@pytest.mark.parametrize("name", registry.names("learned"))
def test_learned_row_on_every_path(name, tmp_path, capsys, prerequisites):
    check_learned_row(name, tmp_path, capsys, prerequisites)


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).kind != "learned"])
def test_one_model_and_per_task_rows_on_every_path(name, tmp_path, capsys):
    check_one_model_row(name, tmp_path, capsys)


def check_learned_row(name: str, tmp_path: Path, capsys, prerequisites: dict[str, Path]) -> None:
    """A learned row through fit, resume, test, export, ExportedModel, predict, online, compare."""
    method = registry.get(name)
    first = prerequisites.get(method.starts_from) if method.starts_from else None
    config = write_config(name, tmp_path, str(first) if first else None)
    model, dm = build_from_config([str(config)])
    assert registry.row_of(model)[0] == name

    # fit: a straight run, and a second one resumed from the first's checkpoint half-way; a
    # training-free row (fit refused) is tested, exported and compared as built, with no checkpoint
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    if not model.learns:
        refused(capsys, model.refusal("fit"), "fit", "--config", config, "--trainer.default_root_dir", straight)
        assert not (straight / "checkpoints").exists()
        ckpt, with_ckpt = None, ()
    else:
        code, err = cli(capsys, "fit", "--config", config, "--trainer.default_root_dir", straight)
        assert code == 0, err
        ckpt = straight / "checkpoints" / "last.ckpt"
        assert read_checkpoint(ckpt)["adamerge"]["row"] == name
        half = next((straight / "checkpoints").glob(f"*step={STEPS // 2}.ckpt"))
        code, err = cli(capsys, "fit", "--config", config, "--trainer.default_root_dir", resumed,
                        "--ckpt_path", half)
        assert code == 0, err
        a, b = learned(ckpt), learned(resumed / "checkpoints" / "last.ckpt")
        assert a.keys() == b.keys()
        for key in a:  # same process, same operations in the same order: bitwise equal
            assert torch.equal(a[key], b[key]), key
        with_ckpt = ("--ckpt_path", ckpt)

    # test: the row's name in results.json
    code, err = cli(capsys, "test", "--config", config, *with_ckpt,
                    "--trainer.default_root_dir", tmp_path / "test")
    assert code == 0, err
    results = json.loads(next((tmp_path / "test").rglob("results.json")).read_text())
    assert list(results["methods"]) == [name]

    # export, and the export read back without the pool: the module's logits
    export_dir = tmp_path / "export"
    reason = model.refusal("export")
    if reason:
        refused(capsys, reason, "export", "--config", config, *with_ckpt, "--out", export_dir)
    else:
        code, err = cli(capsys, "export", "--config", config, *with_ckpt, "--out", export_dir)
        assert code == 0, err
        assert json.loads((export_dir / "export.json").read_text())["row"] == name
        if ckpt is not None:
            model.load_coefficients(str(ckpt))
        model.eval()
        exported = ExportedModel.from_folder(export_dir)
        x = torch.stack([dm.dataset(model.task_names[0], "test")[i][0] for i in range(6)])
        params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
        for task in model.eval_tasks:
            with torch.no_grad():
                want = model.task_logits({task: x}, params)[task]
            torch.testing.assert_close(exported(x, task), want, rtol=1e-5, atol=1e-5)
        check_predict_from_export(capsys, export_dir, model.task_names[-1],
                                  dm.dataset(model.task_names[-1], "test"), tmp_path / "predict")

    # online: two steps of the stream
    reason = model.refusal("online")
    args = ("online", "--config", config, "--out", tmp_path / "online", "--stop-after", "2", "--no-progress")
    if reason:
        refused(capsys, reason, *args)
    else:
        code, err = cli(capsys, *args)
        assert code == 0, err
        state = torch.load(tmp_path / "online" / "state.pt", weights_only=True)
        assert state["step"] == 2 and state["rows"] == 2 * 8 * len(model.task_names)

    # compare --config: the row by its name (and what it starts from, run first)
    code, err = cli(capsys, "compare", "--config", config, "--out", tmp_path / "compare", "--methods", name,
                    "--steps", "2", "--val-split", "none")
    assert code == 0, err
    rows = json.loads((tmp_path / "compare" / "results.json").read_text())["methods"]
    assert name in rows and all(0 <= a <= 100 for a in rows[name]["per_task"].values())


def check_one_model_row(name: str, tmp_path: Path, capsys) -> None:
    """A static, fitted or per-task row through compare, export --method and predict --export."""
    method = registry.get(name)
    config = write_config("adamerging_layerwise", tmp_path)  # a config names the pool and data
    code, err = cli(capsys, "compare", "--config", config, "--out", tmp_path / "compare", "--methods", name,
                    "--val-split", "none")
    assert code == 0, err
    assert name in json.loads((tmp_path / "compare" / "results.json").read_text())["methods"]
    export_dir = tmp_path / "export"
    args = ("export", "--config", config, "--method", name, "--out", export_dir)
    reason = method.refusal("export")
    if reason:
        refused(capsys, reason, *args)
        return
    code, err = cli(capsys, *args)
    assert code == 0, err
    manifest = json.loads((export_dir / "export.json").read_text())
    assert manifest["row"] == name and manifest["hparams"] == json.loads(json.dumps(method.defaults()))
    # the export is the row's merge: the encoder with its parameters, each task's head
    from adamerge.compare import one_model
    model, dm = build_from_config([str(config)])
    loaded = model.loaded
    dm.select_tasks(loaded.task_vectors.task_names)
    params = one_model(method, loaded, dm, method.defaults())
    exported = ExportedModel.from_folder(export_dir)
    x = torch.stack([dm.dataset(loaded.task_vectors.task_names[0], "test")[i][0] for i in range(6)])
    from torch.func import functional_call
    with torch.no_grad():
        feats = functional_call(loaded.encoder, dict(params), (x,), strict=False)
        for task, head in loaded.heads.items():
            torch.testing.assert_close(exported(x, task), head(feats), rtol=1e-5, atol=1e-5)
    check_predict_from_export(capsys, export_dir, loaded.task_vectors.task_names[0],
                              dm.dataset(loaded.task_vectors.task_names[0], "test"), tmp_path / "predict")


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")
                                            if p.parent.name != "tasks"))
def test_every_shipped_config_parses(config, capsys):
    """``adamerge fit --config FILE --print_config`` for every YAML under configs/ but the task
    registries of configs/tasks/ (``tasks_file`` of a pool; nothing is loaded: the configs name
    files and hub weights only users have)."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert exc.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "pool" in printed["model"].get("init_args", printed["model"])
