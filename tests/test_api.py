"""The public API: the README's Python snippet runs, and module paths of adamerge 0.1 still load
(with a warning) from imports and from YAML configs."""

import importlib
import re
import sys
from pathlib import Path

import pytest

import adamerge
from adamerge._aliases import MOVED, MovedModuleWarning
from adamerge.commands.main import main

ROOT = Path(__file__).resolve().parents[1]


def readme_python_api() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_python_api(), "README.md#python-api", "exec"), scope)
    acc = scope["accuracy"]
    assert list(acc) == ["digits", "shapes", "gratings"] and all(0 <= a <= 100 for a in acc.values())
    assert isinstance(scope["model"], adamerge.AdaMerging)
    assert "digits" in capsys.readouterr().out


def test_public_names_are_importable():
    for name in adamerge.__all__:
        assert getattr(adamerge, name) is not None, name


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_with_a_warning(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(MovedModuleWarning, match=f"{re.escape(old)} is deprecated .* use {re.escape(MOVED[old])}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_old_class_path_in_a_yaml_config_still_runs(tmp_path, monkeypatch):
    """A user's YAML written for adamerge 0.1 (``adamerge.suite.SuitePool``) fits, with a warning."""
    for old in ("adamerge.suite", "adamerge.pool"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    config = (ROOT / "configs" / "tiny.yaml").read_text()
    assert "adamerge.suites.SuitePool" in config and "adamerge.suites.SuiteSource" in config
    old_config = tmp_path / "old.yaml"
    old_config.write_text(config.replace("adamerge.suites.SuitePool", "adamerge.suite.SuitePool")
                          .replace("adamerge.suites.SuiteSource", "adamerge.suite.SuiteSource"))
    with pytest.warns(MovedModuleWarning, match="adamerge.suite is deprecated"):
        code = main(["fit", "--config", str(old_config), "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                     "--trainer.enable_progress_bar", "false"])
    assert code == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
