"""The comparison report: every method row, JSON schema, Markdown table, heatmaps."""

import json

import pytest
import torch

from adamerge.commands.main import main
from adamerge.compare import CompareSettings, compare
from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.methods import registry
from adamerge.report import markdown_table, summarize
from adamerge.suites.synthetic import SuitePool, SuiteSource


def test_compare_writes_every_row(tmp_path):
    loaded = SuitePool("tiny").load()
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, eval_batch_size=256)
    # every tuned row searches two points of its own grid (fast; the search code path is kept)
    grids = {n: {k: g[:2] for k, g in registry.get(n).tune.items()} for n in registry.names() if registry.get(n).tune}
    settings = CompareSettings(steps=3, grids=grids)
    lines = []
    compare(loaded, dm, tmp_path, settings, registry.names(), suite="tiny", say=lines.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suite"] == "tiny" and list(saved["methods"]) == registry.names()  # --methods all
    for name, row in saved["methods"].items():
        assert set(row["per_task"]) == {"digits", "shapes", "gratings"}, name
        assert 0 <= row["avg"] <= 100
        assert row["avg"] == pytest.approx(sum(row["per_task"].values()) / 3)
    assert saved["methods"]["individual"]["normalized_avg"] == pytest.approx(100.0)
    assert saved["profiles"]["individual"] == {"models": "K", "storage": "K experts", "data": "-"}
    assert saved["profiles"]["task_arithmetic"]["data"] == "labeled val (tuning)"
    assert saved["profiles"]["adamerging_layerwise"] == {"models": "1", "storage": "-", "data": "unlabeled test images"}
    assert saved["tuned"]["task_arithmetic"]["scaling"] in grids["task_arithmetic"]["scaling"]
    assert saved["hparams"]["task_arithmetic"]["scaling"] == saved["tuned"]["task_arithmetic"]["scaling"]
    assert saved["hparams"]["adamerging_layerwise_pp"]["trim"] == 0.2
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert "| models | extra storage | data used |" in (tmp_path / "results.md").read_text().splitlines()[0]
    notes = (tmp_path / "results.md").read_text().split("\n\n")[1]
    assert f"- `ties`: {registry.get('ties').description} (keep=0.2, scaling=" in notes and "(tuned)" in notes
    for m in ("adamerging_taskwise", "adamerging_layerwise", "adamerging_layerwise_pp"):
        png = tmp_path / f"coefficients_{m}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert list((tmp_path / "runs" / m).rglob("events.out.tfevents.*"))
    assert any("adamerging_layerwise" in line and "avg" in line for line in lines)
    # the pool's tensors were not changed by any method
    base = SuitePool("tiny").load()
    for a, b in zip(base.task_vectors.tensors, loaded.task_vectors.tensors):
        assert torch.equal(a, b)


def test_summarize_and_table():
    row = summarize({"a": 50.0, "b": 80.0}, {"a": 100.0, "b": 80.0})
    assert row["avg"] == 65.0 and row["normalized_avg"] == pytest.approx(75.0)
    table = markdown_table({"tasks": ["a", "b"], "methods": {"m": row}})
    assert "| m | 50.0 | 80.0 | **65.0** | 75.0 |" in table


def test_unknown_method_is_an_error(tmp_path):
    loaded = SuitePool("tiny").load()
    dm = MultiTaskDataModule(SuiteSource("tiny"))
    with pytest.raises(ValueError, match="unknown methods"):
        compare(loaded, dm, tmp_path, methods=("magic",))


def test_suite_diagnostics_scans_experts_and_lambdas(capsys):
    """scripts/suite_diagnostics.py: one row for the base, each expert and each lambda."""
    import runpy
    from pathlib import Path
    script = Path(__file__).parents[1] / "scripts" / "suite_diagnostics.py"
    mod = runpy.run_path(str(script))
    mod["main"](["--suite", "tiny", "--lambdas", "0.0", "1.0"])
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if "sum H" in ln]
    assert [r.split("  sum H")[0].strip() for r in rows] == [
        "base", "expert digits", "expert shapes", "expert gratings", "task arithmetic 0", "task arithmetic 1"]
    # lambda 0 is the base model itself
    assert rows[0].split("sum H")[1] == rows[4].split("sum H")[1]
    probe = [ln for ln in lines if ln.startswith("linear probe")]
    assert len(probe) == 1 and all(f"{t} " in probe[0] for t in ("digits", "shapes", "gratings"))
    trim = [ln for ln in lines if ln.startswith("own-task accuracy")]
    assert len(trim) == 1 and all(f"{t} " in trim[0] for t in ("digits", "shapes", "gratings"))
    with pytest.raises(SystemExit):
        mod["main"](["--suite", "tiny", "--set", "expert_lr"])


@pytest.mark.parametrize("row", ["wemoe", "twin_merging"])
def test_compare_config_of_a_method_without_prior_runs(row, tmp_path, capsys):
    """``compare --config`` with a WEMoE or Twin-Merging config: the config's settings reach the
    row of its class (on 00f7573: AttributeError 'prior')."""
    from test_contract import write_config
    config = write_config(row, tmp_path, None)
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "c"), "--methods", row,
                 "adamerging_taskwise", "--steps", "1", "--val-split", "none", "--model.init_args.lr", "0.002"]) == 0
    used = json.loads((tmp_path / "c" / "results.json").read_text())["hparams"]
    assert used[row]["lr"] == 0.002 and used["adamerging_taskwise"]["lr"] == 0.001
    out = capsys.readouterr()
    bars = (out.out + out.err).replace("\r", "\n")
    assert "fit: " in bars and "1/1" in bars  # the learned rows' bar counts steps
    assert "Epoch 0" not in bars and "v_num" not in bars


def test_compare_help_shows_config_and_refuses_a_run_without_one(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--config FILE" in capsys.readouterr().out
    assert main(["compare", "--out", "nowhere"]) == 1
    assert "needs --config FILE" in capsys.readouterr().err
