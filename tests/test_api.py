"""The public API: the README's Python snippet runs and every public name imports."""

import re
from pathlib import Path


import adamerge

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


def test_every_learned_class_of_the_registry_is_public():
    from adamerge.methods import registry
    for name in registry.names("learned"):
        cls = registry.get(name).build
        assert getattr(adamerge, cls.__name__) is cls, cls.__name__
