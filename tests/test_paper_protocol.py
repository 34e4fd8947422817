"""``--protocol paper``: the official AdaMerging code's recipe (docs/fidelity.md)."""

import json
from pathlib import Path

import pytest
import torch

from adamerge.commands.compare import paper_protocol
from adamerge.commands.main import main
from adamerge.models.clip import official_trim
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
