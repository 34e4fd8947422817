"""``--protocol paper``: the official AdaMerging code's recipe (docs/fidelity.md)."""

import json
from pathlib import Path

import pytest
import torch

from adamerge.commands.compare import paper_protocol, paper_schedules
from adamerge.commands.main import main
from adamerge.models.clip import official_trim
from adamerge.methods import registry
from adamerge.report import evaluate
from adamerge.suites.synthetic import SuitePool, SuiteSource

ROOT = Path(__file__).resolve().parents[1]


def test_official_trim_counts_the_zero_text_side_tensors():
    # image towers of open_clip ViT-B-32 / ViT-L-14 (parameter counts of create_model(...).visual)
    assert official_trim("ViT-B-32", 87_849_216) == 0.2583
    assert official_trim("ViT-L-14", 303_966_208) == 0.2254
    with pytest.raises(ValueError, match="no model config 'ViT-Q'"):
        official_trim("ViT-Q", 1)


def test_paper_protocol_hparams_and_overrides():
    class Loaded:  # an open_clip pool's recipe and encoder size
        encoder_recipe = {"kind": "open_clip", "model": "ViT-B-32"}
        encoder = torch.nn.Linear(87_849_216 // 1000, 1000, bias=False)  # 87,849,000 parameters
    hp = paper_protocol(Loaded(), {"ties": {"scaling": 0.5}})
    assert hp["task_arithmetic"] == {"scaling": 0.3}
    assert hp["ties"] == {"scaling": 0.5, "merge": "sum", "keep": 0.2}  # --hparam wins
    assert hp["adamerging_layerwise_pp"]["trim"] == pytest.approx(0.2583, abs=1e-4)
    assert "adamerging_layerwise_pp" not in paper_protocol(SuitePool("tiny").load(), {})  # 0.2: no text side


def test_compare_with_the_paper_protocol(tmp_path, capsys):
    """TA and TIES at a fixed 0.3 (TIES: the disjoint sum), batches of 32; the TIES row equals the
    disjoint sum computed by hand on the tiny pool."""
    out = tmp_path / "out"
    assert main(["compare", "--config", str(ROOT / "configs" / "tiny.yaml"), "--protocol", "paper", "--out", str(out),
                 "--methods", "task_arithmetic", "ties", "adamerging_taskwise", "--steps", "2",
                 "--trainer.default_root_dir", str(tmp_path / "run")]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["protocol"] == "paper" and saved["settings"]["batch_size"] == 32
    assert saved["hparams"]["task_arithmetic"]["scaling"] == 0.3
    assert saved["hparams"]["ties"] == {"keep": 0.2, "scaling": 0.3, "merge": "sum"}
    assert "task_arithmetic" not in saved.get("tuned", {}) and "ties" not in saved.get("tuned", {})
    loaded = SuitePool("tiny").load()
    tv, base = loaded.task_vectors, {n: p.detach() for n, p in loaded.encoder.named_parameters()}
    merged = {}
    for name, tau in zip(tv.names, tv.tensors):  # trim to the top 20 % per task, elect, disjoint sum
        keep = []
        for k in range(tv.num_tasks):
            mags = torch.cat([t[k].reshape(-1).abs() for t in tv.tensors])
            thr = mags.sort().values[int(mags.numel() * 0.8) - 1]
            keep.append(tau[k].abs() > thr)
        trimmed = tau * torch.stack(keep)
        sign = torch.sign(trimmed.sum(0))
        merged[name] = base[name] + 0.3 * (trimmed * (torch.sign(trimmed) == sign)).sum(0)
    source = SuiteSource("tiny")
    expect = evaluate(loaded.encoder, merged, loaded.heads, {t: source.dataset(t, "test") for t in tv.task_names}, 256)
    assert saved["methods"]["ties"]["per_task"] == pytest.approx(expect, abs=1e-9)


class _OpenCLIP:  # a loaded open_clip pool as paper_schedules sees it: its recipe
    def __init__(self, model):
        self.encoder_recipe = {"kind": "open_clip", "model": model, "pretrained": "openai"}


def test_each_learned_row_has_its_own_paper_batch_and_steps():
    """Issue 31: --protocol paper gave every learned row AdaMerging's batch and schedule."""
    def schedule(name, model="ViT-B-32"):
        return registry.get(name).paper_schedule(model)
    # the official recipes, each from its source (the rows' paper_note)
    assert schedule("adamerging_layerwise") == {"batch_size": 32, "steps": 500}  # two batches of 16, 500 epochs
    assert schedule("wemoe") == {"batch_size": 16, "steps": 1000}               # scripts/clip_dictmoe.py
    assert schedule("adarank") == {"batch_size": 16, "steps": 10000}            # adarank_B_T8/adarank_TA.yaml
    assert schedule("adarank", "ViT-L-14") == {"batch_size": 4, "steps": 10000}  # adarank_L_T8/adarank_TA.yaml
    assert schedule("tinting") == {"batch_size": 32, "steps": 500}              # SyMerge configs/symerge.yaml
    assert schedule("adamerging_layerwise_surgery") == {"batch_size": 16, "steps": 1000}
    # paper_schedules: every learned row chosen (static ones have none), on the pool's architecture
    rows = ["task_arithmetic", "adamerging_layerwise", "wemoe", "adarank", "tinting", "adamerging_layerwise_surgery"]
    for model in ("ViT-B-32", "ViT-L-14"):
        got = paper_schedules(_OpenCLIP(model), rows)
        assert sorted(got) == sorted(rows[1:]) and all(got[r] == schedule(r, model) for r in rows[1:])
    # the row a chosen row starts from is scheduled too; other pools take the rows' "*" values
    tiny = paper_schedules(SuitePool("tiny").load(), ["adamerging_layerwise_surgery", "adarank"])
    assert sorted(tiny) == sorted(["adamerging_layerwise", "adamerging_layerwise_surgery", "adarank"])
    assert all(tiny[r] == schedule(r, None) for r in tiny) and tiny["adarank"]["batch_size"] == 16
    # --steps replaces every row's steps, not its batch
    seven = paper_schedules(_OpenCLIP("ViT-L-14"), ["wemoe", "adarank"], steps=7)
    assert [seven["wemoe"], seven["adarank"]] == [{"batch_size": 16, "steps": 7}, {"batch_size": 4, "steps": 7}]
    for name in registry.names("learned"):  # every learned row says where its values come from
        assert registry.get(name).paper_note
    with pytest.raises(ValueError, match="paper_batch needs a '\\*' entry"):
        registry.Method("x", "learned", "x", registry.get("adarank").build, paper_batch={"ViT-L-14": 4})


@pytest.fixture
def trained(monkeypatch):
    """compare's learned runner replaced by a recorder of what each row would train with:
    ``{row: (images per task per step, steps)}`` (no training: the test stays fast)."""
    import adamerge.compare as comparison
    seen = {}

    def record(bench, method, hp, fixed):
        schedule = bench.settings.schedules.get(method.name, {})  # what run_learned reads
        seen[method.name] = (schedule.get("batch_size", bench.datamodule.batch_size),
                             schedule.get("steps", bench.settings.steps))
        return {t: 50.0 for t in bench.eval_sets}, {}
    monkeypatch.setitem(comparison.RUNNERS, "learned", record)
    yield seen


def test_a_rows_schedule_sets_its_trainers_steps_and_its_batch(tmp_path):
    from adamerge.compare import CompareSettings, compare
    from adamerge.data.datamodule import MultiTaskDataModule
    from adamerge.io.checkpoints import read_checkpoint
    loaded = SuitePool("tiny").load()
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16, eval_batch_size=64)
    made = []  # the data modules the rows train on
    with_options = dm.with_options
    dm.with_options = lambda **kw: made.append(with_options(**kw)) or made[-1]
    settings = CompareSettings(steps=5, val_split=None, schedules={"adamerging_taskwise": {"batch_size": 4, "steps": 2}})
    compare(loaded, dm, tmp_path, settings, ["adamerging_taskwise", "adamerging_layerwise"], say=lambda _: None)
    assert read_checkpoint(tmp_path / "runs" / "adamerging_taskwise" / "final.ckpt")["global_step"] == 2
    assert read_checkpoint(tmp_path / "runs" / "adamerging_layerwise" / "final.ckpt")["global_step"] == 5
    assert [m.batch_size for m in made] == [4]  # the other row trains on the common module (16)


@pytest.mark.parametrize("protocol", ["paper", "ours"])
def test_compare_trains_each_row_with_its_protocol_schedule(protocol, trained, tmp_path):
    out = tmp_path / "out"
    assert main(["compare", "--config", str(ROOT / "configs" / "tiny.yaml"), "--protocol", protocol,
                 "--out", str(out), "--methods", "adamerging_layerwise", "wemoe", "adarank",
                 "--trainer.default_root_dir", str(tmp_path / "run")]) == 0
    saved = json.loads((out / "results.json").read_text())["settings"]
    rows = ["adamerging_layerwise", "wemoe", "adarank"]
    assert sorted(trained) == sorted(rows)
    if protocol == "paper":
        assert [trained[r] for r in rows] == [(32, 500), (16, 1000), (16, 10000)]
        assert saved["paper_schedules"]["wemoe"] == {"batch_size": 16, "steps": 1000}
        assert saved["batch_size"] == 32 and saved["steps"] == 500
    else:  # ours, unchanged: every row the config's batch and trainer.max_steps
        assert [trained[r] for r in rows] == [(16, 60)] * 3
        assert "paper_schedules" not in saved and saved["batch_size"] == 16 and saved["steps"] == 60


def test_demo_paper_protocol_takes_each_rows_batch_and_the_given_steps(trained, tmp_path, monkeypatch):
    import adamerge.commands.demo as demo
    # the tiny suite in place of the demo suite keeps this test fast; the code path is the demo's
    monkeypatch.setattr(demo, "SuitePool", lambda name, **kw: SuitePool("tiny", **kw))
    monkeypatch.setattr(demo, "SuiteSource", lambda name, **kw: SuiteSource("tiny", **kw))
    assert main(["demo", "--protocol", "paper", "--out", str(tmp_path / "p"), "--steps", "3",
                 "--methods", "adamerging_taskwise", "task_arithmetic_surgery", "tinting"]) == 0
    rows = ["adamerging_taskwise", "task_arithmetic_surgery", "tinting"]
    assert sorted(trained) == sorted(rows) and [trained[r] for r in rows] == [(32, 3), (16, 3), (32, 3)]
    trained.clear()
    assert main(["demo", "--out", str(tmp_path / "o"), "--methods", "adamerging_taskwise", "tinting"]) == 0
    assert sorted(trained.values()) == [(16, 500), (16, 500)]  # ours: unchanged
