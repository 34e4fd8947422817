"""scripts/readme_figures.py: the rewriting between markers (not the timings it measures)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

DATA = {
    "tests": {"count": 12, "date": "2026-01-02", "nproc": 2},
    "suite": {"count": 10, "seconds": 75.4, "date": "2026-01-01", "nproc": 2},
    "demo": {"first_seconds": 330.0, "cached_seconds": 90.2, "avg": {}, "table": ["  avg", "base  72.6"],
             "date": "2026-01-02", "nproc": 2},
    "tiny": {"first_seconds": 150.0, "cached_seconds": 30.0, "steps": 60, "fit_val_acc_avg": 44.2,
             figures.BASELINE: 44.8, figures.LEARNED: 44.2, "ta_scaling": 0.4,
             "date": "2026-01-02", "nproc": 2},
}


def project(tmp_path: Path, data=DATA) -> Path:
    """A repository with the three target files, their markers and stale figures between them."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "README.md").write_text(
        "# x\n\nintro\n<!-- figures:start (scripts/readme_figures.py) -->\nstale\n<!-- figures-data\n"
        + json.dumps(data) + "\n-->\n<!-- figures:end -->\n\n## Usage\n")
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\n# figures:start\n# old\n# figures:end\n'
                                             'addopts = "-q"\n')
    (tmp_path / "configs" / "tiny.yaml").write_text("# Tiny\n# figures:start\n# figures:end\nseed_everything: 0\n")
    return tmp_path


def test_replace_block_keeps_the_markers_and_everything_outside():
    text = "a\n<!-- figures:start x -->\nold\nold2\n<!-- figures:end -->\nb"
    out = figures.replace_block(text, figures.MD_START, figures.MD_END, "new", "F.md")
    assert out == "a\n<!-- figures:start x -->\nnew\n<!-- figures:end -->\nb"
    assert figures.replace_block(out, figures.MD_START, figures.MD_END, "new", "F.md") == out


@pytest.mark.parametrize("text", ["a\nb", "<!-- figures:start -->\nx", "<!-- figures:end -->\n<!-- figures:start -->",
                                  "<!-- figures:start -->\n<!-- figures:start -->\n<!-- figures:end -->"])
def test_replace_block_refuses_missing_or_doubled_markers_naming_the_file(text):
    with pytest.raises(figures.FiguresError, match="^F.md: expected one line starting with"):
        figures.replace_block(text, figures.MD_START, figures.MD_END, "new", "F.md")


def test_render_writes_every_file_then_check_passes(tmp_path, capsys):
    root = project(tmp_path)
    assert figures.main(["--root", str(root), "--check"]) == 1
    assert "README.md: figures differ" in capsys.readouterr().out
    assert figures.main(["--root", str(root), "--render"]) == 0
    assert figures.main(["--root", str(root), "--check"]) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("# x\n\nintro\n<!-- figures:start") and readme.endswith("<!-- figures:end -->\n\n## Usage\n")
    assert "5 min 30 s on a fresh cache" in readme and "base  72.6" in readme
    assert "12 tests (2026-01-02); the suite took 1 min 15 s when it had 10 (2026-01-01)" in readme
    assert figures.read_data(readme) == DATA  # the stored measurements survive the rewrite
    assert "10 tests in 1 min 15 s on 2 cores (2026-01-01" in (root / "pyproject.toml").read_text()
    tiny = (root / "configs" / "tiny.yaml").read_text()
    comment = " ".join(line[2:] for line in tiny.splitlines() if line.startswith("# ") and "figures:" not in line)
    assert "(44.2 % average after 60 steps) does not beat task arithmetic (44.8 %" in comment
    assert "takes 2 min 30 s on a fresh cache, of which about 2 min 0 s build the suite" in comment
    assert max(len(line) for line in tiny.splitlines()) <= 100
    assert "layer-wise AdaMerging (44.2 %) does not beat task arithmetic (44.8 %)" in readme
    assert tiny.startswith("# Tiny\n# figures:start\n# Measured") and tiny.endswith("# figures:end\nseed_everything: 0\n")


def test_a_file_without_markers_is_refused_and_nothing_is_written(tmp_path, capsys):
    root = project(tmp_path)
    (root / "configs" / "tiny.yaml").write_text("seed_everything: 0\n")
    before = (root / "README.md").read_text()
    assert figures.main(["--root", str(root), "--render"]) == 2
    assert "configs/tiny.yaml: expected one line starting with '# figures:start'" in capsys.readouterr().err
    assert (root / "README.md").read_text() == before


def test_missing_stored_figures_are_named(tmp_path, capsys):
    root = project(tmp_path, {k: v for k, v in DATA.items() if k != "demo"})
    assert figures.main(["--root", str(root), "--render"]) == 2
    assert "no stored figures for 'demo'" in capsys.readouterr().err


def test_the_repository_files_match_their_stored_figures():
    assert figures.main(["--root", str(ROOT), "--check"]) == 0


def test_durations():
    assert [figures.duration(s) for s in (0.4, 41, 59.6, 60, 298)] == ["0 s", "41 s", "1 min 0 s", "1 min 0 s",
                                                                        "4 min 58 s"]


def test_the_verdict_follows_the_figures():
    better = {**DATA, "tiny": {**DATA["tiny"], figures.LEARNED: 50.0}}
    assert "(50.0 % average after 60 steps) beats task arithmetic" in " ".join(figures.render_tiny(better).split("\n# "))
    assert "layer-wise AdaMerging (50.0 %) beats task arithmetic" in figures.render_readme_block(better)
