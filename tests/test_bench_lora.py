"""scripts/bench_lora.py on a tiny random Llama: every figure is reported, and the low-rank and
dense variants compute the same step (the same coefficient gradient)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_lora.py"
TINY = ["--layers", "2", "--hidden", "32", "--intermediate", "64", "--heads", "4", "--vocab", "50",
        "-K", "2", "--rank", "3", "--batch", "2", "--seq-len", "6", "--threads", "1"]
KEYS = {"limit_s", "lowrank_s", "dense_s", "lowrank_over_limit", "dense_over_limit",
        "lowrank_over_dense", "task_vector_bytes", "dense_over_lowrank_task_vector_bytes",
        "implied_task_vector_factor", "grad_rel_diff", "cpu_s", "merge_s", "adapted_params", "model",
        "tasks", "rank"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_has_every_figure_and_equal_gradients(bench, tmp_path, capsys):
    out = tmp_path / "lora.json"
    report = bench.main([*TINY, "--in-process", "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report == json.loads(out.read_text())
    assert KEYS <= set(report) and report["isolated"] is False and "peak_rss_mb" not in report
    assert report["adapted_params"] == 2 * 7  # q k v o gate up down per layer
    assert report["lowrank_over_dense"] == pytest.approx(report["lowrank_s"] / report["dense_s"],
                                                         rel=0.01, abs=1e-3)
    # K=2, rank 3: dense 2 * out * in floats per weight, low-rank 2 * 3 * (out + in) (+ the [P, K] scales)
    tvb = report["task_vector_bytes"]
    assert tvb["dense"] == 2 * 4 * 2 * (4 * 32 * 32 + 3 * 32 * 64)
    assert tvb["lowrank"] == 2 * 4 * 2 * 3 * (4 * 64 + 3 * 96) + 4 * 14 * 2
    assert report["implied_task_vector_factor"] == pytest.approx(
        (4 * 32 * 32 + 3 * 32 * 64) / (3 * (4 * 64 + 3 * 96)), abs=0.01)
    assert report["grad_rel_diff"] <= 1e-4


def test_lowrank_and_dense_steps_give_the_same_coefficient_gradient(bench):
    ns = bench.parser().parse_args(TINY)
    torch.set_num_threads(1)
    low_step, low_info, low_merge = bench.build_variant("lowrank", ns)
    dense_step, dense_info, _ = bench.build_variant("dense", ns)
    g_low, g_dense = low_step().clone(), dense_step().clone()
    assert g_low.shape == g_dense.shape == (14, 2)  # layer-wise: one row per adapted weight
    assert (g_dense.abs().amax(1) > 0).all()  # every weight's adapters reach the loss
    assert not torch.allclose(g_dense[:, 0], g_dense[:, 1])  # the two experts differ
    assert (g_low - g_dense).abs().max() <= 1e-4 * g_dense.abs().max()
    assert torch.equal(low_step(), g_low)  # reused buffers, unchanged coefficients: the same step again
    assert dense_info["task_vector_bytes"] > low_info["task_vector_bytes"]
    low_merge()  # the merge alone runs on the same (reused) buffers


def test_limit_step_runs_and_unknown_variants_are_refused(bench):
    ns = bench.parser().parse_args(TINY)
    step, info, merge = bench.build_variant("limit", ns)
    assert step() is None and merge is None and "task_vector_bytes" not in info
    with pytest.raises(ValueError, match="unknown variant"):
        bench.build_variant("naive", ns)
