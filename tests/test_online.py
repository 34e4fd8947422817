"""``adamerge online``: answer, then adapt; restarts answer every image exactly once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adamerge import AdaMerging
from adamerge.models.pool import PreloadedPool
from adamerge.online import run_online, stream_order
from adamerge.suites.synthetic import SuitePool, SuiteSource

ROOT = Path(__file__).resolve().parents[1]


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def datasets() -> dict:
    src = SuiteSource("tiny")
    return {t: src.dataset(t, "test") for t in src.task_names()}


def model() -> AdaMerging:
    torch.manual_seed(0)
    return AdaMerging(PreloadedPool(SuitePool("tiny").load()), lr=1e-2)


def test_each_batch_is_answered_before_the_model_adapts_on_it(tmp_path):
    m = model()
    before = m.merged.coefficients.detach().clone()
    res = run_online(m, datasets(), tmp_path, batch_size=16, checkpoint_every=5, say=lambda s: None,
                     progress=False, stop_after=1)
    rows = rows_of(tmp_path / "predictions.csv")
    # step 0 was answered with the starting coefficients: the same answers as a fresh model's
    fresh = model()
    params = fresh.merged.merged_parameters()
    order = stream_order({t: len(d) for t, d in datasets().items()}, 0)
    for t, d in datasets().items():
        x = torch.stack([d[i][0] for i in order[t][:16]])
        want = fresh.task_logits({t: x}, params)[t].argmax(-1).tolist()
        got = [int(r["prediction"]) for r in rows if r["task"] == t]
        assert got == want
    assert not torch.equal(m.merged.coefficients.detach(), before)  # then it adapted
    assert res.steps == max((len(d) + 15) // 16 for d in datasets().values())


def test_interrupted_then_continued_equals_uninterrupted(tmp_path):
    full = run_online(model(), datasets(), tmp_path / "full", 16, checkpoint_every=3, say=lambda s: None,
                      progress=False)
    run_online(model(), datasets(), tmp_path / "cut", 16, checkpoint_every=3, say=lambda s: None,
               progress=False, stop_after=7)
    # rows written after the last checkpoint (step 6) are dropped and answered again
    with open(tmp_path / "cut/predictions.csv", "a") as f:
        f.write("6,digits,0,0,0.5,,\n")
    run_online(model(), datasets(), tmp_path / "cut", 16, checkpoint_every=3, say=lambda s: None,
               progress=False)
    a, b = rows_of(tmp_path / "full/predictions.csv"), rows_of(tmp_path / "cut/predictions.csv")
    assert a == b
    assert sum(full.answered.values()) == sum(len(d) for d in datasets().values())
    keys = [(r["task"], r["index"]) for r in b]
    assert len(keys) == len(set(keys))


def test_sigkill_mid_stream_then_restart_answers_every_image_exactly_once(tmp_path):
    SuitePool("tiny").load()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adamerge", "online", "--config", str(ROOT / "configs/tiny.yaml"),
           "--out", str(tmp_path / "run"), "--checkpoint-every", "2", "--data.batch_size", "4",
           "--no-progress"]
    victim = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run/state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    at_kill = torch.load(state, weights_only=True)["step"]
    total = max((len(d) + 3) // 4 for d in datasets().values())
    assert 2 <= at_kill < total, (at_kill, total)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"continuing at step {at_kill}" in proc.stderr
    rows = rows_of(tmp_path / "run/predictions.csv")
    sizes = {t: len(d) for t, d in datasets().items()}
    assert len(rows) == sum(sizes.values())
    for t, n in sizes.items():
        assert sorted(int(r["index"]) for r in rows if r["task"] == t) == list(range(n))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["online_accuracy"]) == set(sizes) and summary["online_accuracy_avg"] > 0


def test_a_state_of_another_stream_is_refused(tmp_path):
    run_online(model(), datasets(), tmp_path, 16, say=lambda s: None, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="a stream of tasks"):
        run_online(model(), datasets(), tmp_path, 8, say=lambda s: None, progress=False)
