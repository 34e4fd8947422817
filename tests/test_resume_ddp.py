"""The shipped tiny config as users run it, in subprocesses: SIGKILL + resume is exact; DDP matches one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from adamerge.methods.adamerging import COEFFICIENTS_KEY
from adamerge.io.checkpoints import read_checkpoint
from adamerge.suites.synthetic import SuitePool

ROOT = Path(__file__).resolve().parents[1]


def command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adamerge", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
            "--seed_everything", "7", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def coefficients(root: Path) -> torch.Tensor:
    return read_checkpoint(root / "checkpoints/last.ckpt")["state_dict"][COEFFICIENTS_KEY]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    SuitePool("tiny").load()  # build the cached suite once, not in two processes at a time
    steps = "100"
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(command(full, "--trainer.max_steps", steps), cwd=ROOT, env=env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(killed, "--trainer.max_steps", steps), cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    periodic = killed / "checkpoints/epoch=0-step=10.ckpt"
    deadline = time.monotonic() + 300
    while not periodic.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)  # no handler, no cleanup: like a preempted machine
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    at_kill = read_checkpoint(killed / "checkpoints/last.ckpt")["global_step"]
    assert 5 <= at_kill < int(steps), at_kill  # killed mid-run, resumable from a periodic checkpoint
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]

    run(command(killed, "--trainer.max_steps", steps, "--ckpt_path", "last"))
    assert read_checkpoint(killed / "checkpoints/last.ckpt")["global_step"] == int(steps)
    diff = (coefficients(killed) - coefficients(full)).abs().max().item()
    assert diff <= 1e-6, f"resumed from step {at_kill}: max abs diff {diff}"
    assert not torch.equal(coefficients(full), torch.full_like(coefficients(full), 0.3))


def test_ddp_two_cpu_processes_equal_single_process(tmp_path):
    SuitePool("tiny").load()
    args = ["--trainer.max_steps", "4", "--data.batch_size", "16"]
    run(command(tmp_path / "single", *args))
    ddp = run(command(tmp_path / "ddp", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    out = ddp.stdout + ddp.stderr
    assert "DDP on 2 processes synchronises ['merged.coefficients']" in out, out[-3000:]
    assert "learned tensors identical on all 2 ranks" in out, out[-3000:]
    single, multi = coefficients(tmp_path / "single"), coefficients(tmp_path / "ddp")
    assert read_checkpoint(tmp_path / "ddp/checkpoints/last.ckpt")["global_step"] == 4
    assert not torch.equal(single, torch.full_like(single, 0.3))
    diff = (single - multi).abs().max().item()
    assert diff <= 1e-5, diff


def learned(root: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(root / "checkpoints/last.ckpt")["state_dict"]


def test_ddp_surgery_synchronises_only_the_adapters_and_matches_one_process(tmp_path):
    SuitePool("tiny").load()
    args = ["--trainer.max_steps", "4", "--data.batch_size", "16", "--model.class_path", "adamerge.methods.Surgery"]
    run(command(tmp_path / "single", *args))
    ddp = run(command(tmp_path / "ddp", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    out = ddp.stdout + ddp.stderr
    synced = out.split("synchronises ", 1)[1].split(" (", 1)[0]
    assert "task_modules.digits.down.weight" in synced and "merged.module" not in synced, out[-3000:]
    assert "learned tensors identical on all 2 ranks" in out, out[-3000:]
    single, multi = learned(tmp_path / "single"), learned(tmp_path / "ddp")
    assert set(single) == set(multi)
    for key in single:
        assert (single[key] - multi[key]).abs().max().item() <= 1e-5, key
