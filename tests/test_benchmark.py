"""`adamerge bench` on a tiny model: it runs, reports every figure, and bf16 halves the storage."""

import json
import subprocess
import sys

import pytest

from adamerge.commands.bench import VARIANTS, bench_main

KEYS = {"limit_s", "adamerge_s", "naive_s", "adamerge_over_limit", "naive_over_adamerge", "task_vector_bytes",
        "surgery_s", "tinting_s", "surgery_over_adamerging", "tinting_over_adamerging", "surgery_uncached_over_cached"}


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
