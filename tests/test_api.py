"""The public API: the README's Python snippet runs and every public name imports."""

import re
import warnings
from pathlib import Path


import adamerge

ROOT = Path(__file__).resolve().parents[1]


def readme_python_api() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch, capsys, caplog):
    """The snippet runs, and under ``adamerge.quiet()`` it is as quiet as the CLI: none of
    Lightning's tips, its stop line or the warnings adamerge's modules trigger by design."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAMERGE_VERBOSE", raising=False)
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        exec(compile(readme_python_api(), "README.md#python-api", "exec"), scope)
    acc = scope["accuracy"]
    assert list(acc) == ["digits", "shapes", "gratings"] and all(0 <= a <= 100 for a in acc.values())
    assert isinstance(scope["model"], adamerge.AdaMerging)
    captured = capsys.readouterr()
    assert "digits" in captured.out
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + \
        (captured.out + captured.err).splitlines()
    noise = ("Tip:", "litlogger", "in eval mode at the start of training", "LeafSpec", "`Trainer.fit` stopped")
    assert not [m for m in said if any(n in m for n in noise)], said


def test_public_names_are_importable():
    for name in adamerge.__all__:
        assert getattr(adamerge, name) is not None, name


def test_every_learned_class_of_the_registry_is_public():
    from adamerge.methods import registry
    for name in registry.names("learned"):
        cls = registry.get(name).build
        assert getattr(adamerge, cls.__name__) is cls, cls.__name__
