"""`adamerge bench` on a tiny model: it runs, reports every figure, and bf16 halves the storage."""

import json
import subprocess
import sys

import pytest

from adamerge.commands.bench import VARIANTS, bench_main

KEYS = {"limit_s", "adamerge_s", "naive_s", "adamerge_over_limit", "naive_over_adamerge", "task_vector_bytes",
        "surgery_s", "tinting_s", "surgery_over_adamerging", "tinting_over_adamerging", "surgery_uncached_over_cached",
        "surgery_miss_s", "miss_bound_s", "surgery_miss_over_bound", "surgery_miss_over_cached",
        "trainer_s", "trainer_over_limit", "trainer_over_adamerge", "wemoe_batch_over_adamerging"}


def test_bench_command_prints_json_last_with_every_figure():
    # every variant in its own process (~15 s each); Twin-Merging's step has its own test below
    variants = [v for v in VARIANTS if v != "twin_merging"]
    proc = subprocess.run([sys.executable, "-m", "adamerge", "bench", "--model", "tiny", "-K", "2", "-B", "1",
                           "--steps", "1", "--warmup", "0", "--variants", *variants],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(res) and set(res["peak_rss_mb"]) == set(res["step_rss_mb"]) == set(variants)
    assert all(v > 0 for v in res["peak_rss_mb"].values())
    assert all(0 <= res["step_rss_mb"][v] <= res["peak_rss_mb"][v] for v in res["step_rss_mb"])
    assert res["adamerge_over_limit"] == pytest.approx(res["adamerge_s"] / res["limit_s"], rel=0.01)
    assert "step 1/1" in proc.stderr  # progress goes to stderr
    for name in ("adamerge_over_limit", "surgery_miss_over_bound"):  # one step: its range is the ratio
        lo, hi = res[f"{name}_range"]
        assert lo == hi == pytest.approx(res[name], abs=1e-3)


def test_the_trainer_variant_steps_a_real_fit_loop_once_per_call():
    import torch

    from adamerge.commands.bench import build_pool, make_batch, trainer_step
    loaded, shape = build_pool("tiny", 2)
    images = make_batch(loaded.task_vectors.task_names, 2, shape, torch.device("cpu"))
    step, stop, module = trainer_step(loaded, torch.device("cpu"), "adamerging_layerwise",
                                      {"granularity": "layerwise"})
    start = module.merged.coefficients.detach().clone()
    try:
        for n in range(1, 4):
            step(images)
            assert module.trainer.global_step == n  # the call returns once its step is done
    finally:
        stop()
    assert not torch.equal(module.merged.coefficients.detach(), start)


def test_ranges_of_repeated_steps_and_the_profile(capsys):
    """Each figure comes with the range over its repetitions (ratios of steps timed side by side),
    and ``--profile`` prints the top operators of one step of each variant."""
    bench_main(["--model", "tiny", "-K", "2", "-B", "1", "--steps", "3", "--warmup", "0", "--no-memory",
                "--variants", "limit", "adamerge", "surgery_miss", "miss_bound", "--profile", "4"])
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    for name in ("adamerge_over_limit", "surgery_miss_over_bound"):
        lo, hi = res[f"{name}_range"]
        assert lo <= hi and lo > 0
    lo, hi = res["adamerge_s_range"]
    assert lo <= res["adamerge_s"] <= hi
    assert set(res["profile"]) == {"limit", "adamerge", "surgery_miss", "miss_bound"}
    assert all(1 <= len(rows) <= 4 and rows[0]["self_ms"] >= rows[-1]["self_ms"] for rows in res["profile"].values())
    assert "profile of one adamerge step" in captured.err


def test_bf16_storage_halves_task_vector_bytes(capsys):
    figures = {}
    for dtype in ("float32", "bfloat16"):
        bench_main(["--model", "tiny", "-K", "3", "-B", "1", "--steps", "1", "--warmup", "0", "--no-memory",
                    "--variants", "adamerge", "--task-vector-dtype", dtype, "--per-task-backward"])
        figures[dtype] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["bfloat16"]["task_vector_bytes"] * 2 == figures["float32"]["task_vector_bytes"]
    assert figures["bfloat16"]["per_task_backward"] is True and "adamerge_s" in figures["bfloat16"]


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_main(["--model", "tiny", "-K", "0"])
    assert "--tasks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model"):
        bench_main(["--model", "ViT-Nope", "--no-memory"])


def test_twin_merging_step_is_benched_and_refuses_per_task_backward(capsys):
    bench_main(["--model", "tiny", "-K", "2", "-B", "1", "--steps", "1", "--warmup", "0", "--no-memory",
                "--variants", "adamerge", "twin_merging"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["twin_merging_s"] > 0 and "twin_merging_over_adamerging" in res
    with pytest.raises(ValueError, match="twin_merging.*per_task_backward"):
        bench_main(["--model", "tiny", "-K", "2", "-B", "1", "--steps", "1", "--warmup", "0", "--no-memory",
                    "--variants", "twin_merging", "--per-task-backward"])
