"""The method registry and the commands that read it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adamerge.commands.main import main
from adamerge.methods import AdaMerging, registry
from adamerge.methods.registry import Method
from adamerge.methods.static import task_arithmetic

ROOT = Path(__file__).resolve().parents[1]


def test_every_entry_declares_kind_description_and_resolvable_defaults():
    assert registry.names() == list(registry.REGISTRY)
    for name in registry.names():
        m = registry.get(name)
        assert m.name == name and m.kind in registry.KINDS and m.description and "\n" not in m.description
        assert m.defaults() == m.resolve({})
    assert registry.get("adamerging_layerwise_pp").defaults()["trim"] == 0.2
    assert registry.get("adamerging_taskwise").defaults()["granularity"] == "taskwise"
    # defaults not named in the entry come from the builder's own signature
    assert registry.get("adamerging_layerwise").defaults()["prior"] == 0.3
    assert registry.get("task_arithmetic").defaults() == {"scaling": 0.3}
    assert registry.names("learned") == [n for n in registry.names()
                                        if isinstance(registry.get(n).build, type) and issubclass(registry.get(n).build, AdaMerging)]


def test_bad_names_and_hyperparameters_are_named():
    with pytest.raises(ValueError, match="unknown method 'tis'; did you mean 'ties'"):
        registry.get("tis")
    with pytest.raises(ValueError, match="unknown hyper-parameter of ties 'scale'"):
        registry.get("ties").resolve({"scale": 1.0})
    with pytest.raises(ValueError, match="'lambda' is not an argument of task_arithmetic"):
        Method("x", "static", "x", task_arithmetic, {"lambda": 0.3})
    with pytest.raises(ValueError, match="kind must be one of"):
        Method("x", "magic", "x", task_arithmetic)
    with pytest.raises(ValueError, match="'all' is reserved"):
        Method("all", "static", "x", task_arithmetic)


def test_select_defaults_all_and_subsets():
    assert registry.select(None) == registry.demo_methods()
    assert registry.select(["all"]) == registry.names()
    assert registry.select(["ties", "base", "ties"]) == ["ties", "base"]
    with pytest.raises(ValueError, match="cannot be combined"):
        registry.select(["all", "ties"])
    with pytest.raises(ValueError, match="unknown method"):
        registry.select(["base", "magic"])


def test_methods_option_lists_the_registry(capsys):
    """`adamerge compare --methods` (no names) prints every registered method and exits 0."""
    for command in ("compare", "demo"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--methods"])
        assert stop.value.code == 0
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]
                  if line and not line.startswith(" ")]
        assert listed == registry.names(), command


def test_help_texts_read_the_registry(capsys):
    main(["--help"])
    top = capsys.readouterr().out  # printed without importing the registry: it points to the listing
    assert "adamerge compare --methods" in top
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo = capsys.readouterr().out
    for name in registry.names():
        assert name in demo


def test_unknown_method_and_hparam_fail_in_one_line(capsys):
    assert main(["demo", "--methods", "adamerging_layerwse"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'adamerging_layerwise'" in err
    assert main(["demo", "--methods", "ties", "--hparam", "ties.scale=2"]) == 1
    assert "unknown hyper-parameter of ties 'scale'" in capsys.readouterr().err
    assert main(["demo", "--methods", "ties", "--hparam", "ties"]) == 1
    assert "--hparam expects METHOD.KEY=VALUE" in capsys.readouterr().err


def test_demo_runs_a_subset_with_fixed_hyperparameters(tmp_path, monkeypatch):
    """`--methods NAME ...` runs only those rows; `--hparam` and `--ta-scaling` fix values."""
    import adamerge.commands.demo as demo
    from adamerge.suites import SuitePool, SuiteSource
    # the tiny suite in place of the demo suite keeps this test fast; the code path is the demo's
    monkeypatch.setattr(demo, "SuitePool", lambda name, **kw: SuitePool("tiny", **kw))
    monkeypatch.setattr(demo, "SuiteSource", lambda name, **kw: SuiteSource("tiny", **kw))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--methods", "task_arithmetic", "ties", "base",
                 "--ta-scaling", "0.4", "--hparam", "ties.keep=0.5", "ties.scaling=0.8"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["task_arithmetic", "ties", "base"]
    assert saved["hparams"]["task_arithmetic"] == {"scaling": 0.4}
    assert saved["hparams"]["ties"] == {"keep": 0.5, "scaling": 0.8, "merge": "mean"}
    assert saved["tuned"] == {}  # every tunable value was fixed
    assert saved["descriptions"]["ties"] == registry.get("ties").description


def test_bench_times_a_learned_method_of_the_registry():
    res = subprocess.run([sys.executable, "-m", "adamerge", "bench", "--model", "tiny", "-K", "2", "-B", "2",
                          "--steps", "1", "--warmup", "0", "--no-memory", "--variants", "adamerge",
                          "--method", "adamerging_taskwise"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["method"] == "adamerging_taskwise" and out["granularity"] == "taskwise"
    res = subprocess.run([sys.executable, "-m", "adamerge", "bench", "--method", "ties"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "invalid choice: 'ties'" in res.stderr


def test_readme_method_table_matches_the_registry():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("\n## Methods\n", 1)[1]
    rows = [line.split("|")[1:4] for line in text.split("\n## ", 1)[0].splitlines()
            if line.startswith("| `")]
    assert [(r[0].strip(" `"), r[1].strip(), r[2].strip() == "yes") for r in rows] == \
        [(n, registry.get(n).kind, registry.get(n).demo) for n in registry.names()]


def test_a_module_is_named_after_its_row_and_a_preprocess_without_a_row_is_named_as_such():
    """Row names come from the identity hyper-parameters (on 00f7573 ``preprocess: breadcrumbs``
    was reported as ``adamerging_layerwise``); the row is recorded in every checkpoint."""
    from adamerge import AdaMerging, Surgery
    from adamerge.models.pool import PreloadedPool
    from adamerge.suites.synthetic import SuitePool
    pool = PreloadedPool(SuitePool("tiny").load())
    assert registry.row_of(AdaMerging(pool))[0] == "adamerging_layerwise"
    assert registry.row_of(AdaMerging(pool, lr=0.01, prior=0.2))[0] == "adamerging_layerwise"
    assert registry.row_of(AdaMerging(pool, trim=0.2))[0] == "adamerging_layerwise_pp"
    assert registry.row_of(AdaMerging(pool, preprocess="dare"))[0] == "adamerging_layerwise_dare"
    name, description = registry.row_of(AdaMerging(pool, preprocess="breadcrumbs"))
    assert name == "adamerging_layerwise (preprocess='breadcrumbs')" and "breadcrumbs" in description
    assert registry.row_of(AdaMerging(pool, granularity="taskwise", trim=0.2))[0] == \
        "adamerging_taskwise (trim=0.2)"
    assert registry.row_of(Surgery(pool))[0] == "task_arithmetic_surgery"


def test_fit_then_test_of_a_preprocess_without_a_row_reports_it(tmp_path, capsys):
    import yaml
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["model"]["preprocess"] = "breadcrumbs"
    cfg["trainer"].update(max_steps=2, val_check_interval=2, logger=False)
    path = tmp_path / "bc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["fit", "--config", str(path), "--trainer.default_root_dir", str(run)]) == 0
    assert main(["test", "--config", str(path), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                 "--trainer.default_root_dir", str(tmp_path / "test")]) == 0
    results = json.loads(next((tmp_path / "test").rglob("results.json")).read_text())
    assert list(results["methods"]) == ["adamerging_layerwise (preprocess='breadcrumbs')"]
