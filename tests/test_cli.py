"""The command line, run as users run it (a subprocess on the shipped config)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT, check=True):
    proc = subprocess.run([sys.executable, "-m", "adamerge", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_help_lists_commands():
    out = run("--help").stdout
    assert "fit" in out and "validate" in out and "test" in out
    assert "--ckpt_path" in run("fit", "--help").stdout


def test_help_of_fit_fits_a_screen_and_its_keys_and_defaults_are_the_full_helps():
    """``fit --help`` is the short summary (adamerge.commands.fit_help); every key it lists is a
    key of LightningCLI's full help (``--help-all``) with the default the summary states."""
    import re
    from adamerge.commands.fit_help import KEYS
    short = run("fit", "--help").stdout
    assert len(short.splitlines()) <= 60 and max(map(len, short.splitlines())) <= 100
    full = run("fit", "--help-all").stdout
    assert len(full.splitlines()) > 300  # the whole schema
    entries, current = {}, None  # option -> its description in the full help
    for line in full.splitlines():
        start = re.match(r"^  (?:-\w, )?(--[\w.]+)", line)
        if start:
            current = start.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
    for _, keys in KEYS:
        for key, default, _ in keys:
            option = key.split()[0]
            assert option in short
            if option == "--config":
                continue
            assert option in entries, option
            if default is not None:
                found = re.search(r"default: ([^),]+)[),]", entries[option])
                assert found and found.group(1) == default, (option, default, entries[option][-200:])


def test_help_imports_neither_torch_nor_lightning():
    """``adamerge --help``, ``fit --help``, ``online --help`` and ``convert --help`` print without
    importing torch or Lightning (seconds of imports; the package's names load on first use)."""
    code = ("import contextlib, sys; from adamerge.commands.main import main; main(['--help']); "
            "main(['fit', '--help'])\n"
            "for cmd in ('online', 'convert'):\n"
            "    with contextlib.suppress(SystemExit): main([cmd, '--help'])\n"
            "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: adamerge fit" in proc.stdout and "adamerge convert" in proc.stdout


def test_tiny_config_fits_and_resumes(tmp_path):
    # Everything lands under default_root_dir, including on resume/test from an explicit
    # checkpoint path (LightningCLI's checkpoint re-parse once reset it: files went to the cwd).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false"]
    run("fit", *common, "--trainer.max_steps", "10", "--trainer.val_check_interval", "10")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.stat().st_size < 1_000_000
    assert list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    assert torch.load(last, weights_only=False)["global_step"] == 10
    run("fit", *common, "--trainer.max_steps", "20", "--trainer.val_check_interval", "20",
        "--ckpt_path", "last")
    assert torch.load(last, weights_only=False)["global_step"] == 20
    run("fit", *common, "--trainer.max_steps", "30", "--trainer.val_check_interval", "30",
        "--ckpt_path", str(last), cwd=cwd)
    assert torch.load(last, weights_only=False)["global_step"] == 30
    res = run("test", *common, "--ckpt_path", str(last), cwd=cwd)
    assert "test/acc_avg" in res.stdout
    assert list(cwd.iterdir()) == []
    # a new run into the folder is refused (test_bad_inputs.py); --start_over replaces the old one
    run("fit", *common, "--trainer.max_steps", "5", "--trainer.val_check_interval", "5", "--start_over", "true")
    assert torch.load(last, weights_only=False)["global_step"] == 5
    assert not list((tmp_path / "checkpoints").glob("*-v1.ckpt"))


def test_unknown_command_and_bad_file_fail_cleanly(tmp_path):
    assert run("frobnicate", check=False).returncode == 2
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs/tiny.yaml").read_text().replace(
        "class_path: adamerge.suites.SuitePool\n    init_args:\n      suite: tiny",
        "class_path: adamerge.models.CheckpointPool\n    init_args:\n      model: {class_path: torch.nn.Linear, init_args: {in_features: 2, out_features: 2}}\n"
        "      base: missing.safetensors\n      experts: {a: x.pt}\n      heads: h.safetensors"))
    res = run("fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path), check=False)
    assert res.returncode == 1
    assert "model.pool.base: File does not exist:" in res.stderr and "missing.safetensors" in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_config_matches_the_demo_settings():
    """configs/demo_layerwise.yaml reproduces the demo's layer-wise row: same suite, paper defaults."""
    res = run("fit", "--config", str(ROOT / "configs/demo_layerwise.yaml"), "--print_config")
    cfg = yaml.safe_load(res.stdout)
    assert cfg["model"]["pool"]["init_args"]["suite"] == cfg["data"]["source"]["init_args"]["suite"] == "demo"
    assert cfg["model"]["granularity"] == "layerwise" and cfg["model"]["prior"] == 0.3
    assert cfg["data"]["batch_size"] == 16 and cfg["trainer"]["max_steps"] == 500
