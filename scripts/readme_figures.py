"""Measure the figures the README states and write them where they are stated.

What it measures (each with the date and ``nproc``):

* ``tests``: the number of tests (``pytest --collect-only``);
* ``suite``: the wall time of the whole test suite (``python -m pytest``, about 5 min on 2 cores);
* ``demo``: the wall time of ``adamerge demo`` on a fresh cache, then again on the cached suite
  (their difference is the suite's build), and the table it prints;
* ``tiny``: the wall time of ``adamerge fit --config configs/tiny.yaml`` on a fresh cache, then
  again on the cached suite, and the final accuracies of task arithmetic and layer-wise
  AdaMerging on that suite (``adamerge compare --config configs/tiny.yaml``).

Where it writes them: between the marker lines of

* ``README.md``: ``<!-- figures:start ... -->`` ... ``<!-- figures:end -->`` (the measurements
  themselves are stored in that block, in a ``<!-- figures-data ... -->`` comment, so a figure that
  is not measured again is written from its stored value);
* ``pyproject.toml`` and ``configs/tiny.yaml``: ``# figures:start ...`` ... ``# figures:end``.

A file whose markers are missing is refused (nothing is written). Usage::

    python scripts/readme_figures.py                 # measure everything (the test suite is most of it)
    python scripts/readme_figures.py --skip-suite    # reuse the stored test-suite time
    python scripts/readme_figures.py --render        # measure nothing: rewrite from the stored data
    python scripts/readme_figures.py --check         # exit 1 if a file differs from what --render writes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Mapping

# the tiny config's comment compares the method the config runs with the baseline it should beat
BASELINE = "task_arithmetic"
LEARNED = "adamerging_layerwise"

ROOT = Path(__file__).resolve().parents[1]
README, PYPROJECT, TINY = "README.md", "pyproject.toml", "configs/tiny.yaml"
MD_START, MD_END = "<!-- figures:start", "<!-- figures:end -->"
HASH_START, HASH_END = "# figures:start", "# figures:end"
NBSP = "\u00a0"  # a space textwrap does not break at
DATA_RE = re.compile(r"<!-- figures-data\n(.*?)\n-->", re.S)


class FiguresError(RuntimeError):
    """A file this script writes is not as it expects (markers missing, data missing)."""


# ---------------------------------------------------------------------------------------------
# rewriting


def replace_block(text: str, start: str, end: str, body: str, name: str) -> str:
    """``text`` with the lines strictly between the line that starts with ``start`` and the next
    line that starts with ``end`` replaced by ``body``; both marker lines are kept as they are.
    Refuses (``FiguresError`` naming ``name``) unless there is exactly one such pair."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(start)]
    ends = [i for i, line in enumerate(lines) if line.startswith(end)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise FiguresError(f"{name}: expected one line starting with {start!r} and, after it, one starting "
                           f"with {end!r}; found {len(starts)} and {len(ends)}")
    i, j = starts[0], ends[0]
    return "\n".join(lines[:i + 1] + ([body] if body else []) + lines[j:])


def read_data(readme_text: str, name: str = README) -> dict[str, Any]:
    """The measurements stored in the README's figures block."""
    match = DATA_RE.search(readme_text)
    if not match:
        raise FiguresError(f"{name}: no '<!-- figures-data' comment (the stored measurements) found")
    return json.loads(match.group(1))


def duration(seconds: float, space: str = " ") -> str:
    """``4 min 58 s``, ``41 s`` (``space`` between the words)."""
    s = int(round(seconds))
    return (f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s").replace(" ", space)


def _need(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    if key not in data:
        raise FiguresError(f"no stored figures for {key!r}: measure them (run without --skip-{key})")
    return data[key]


def render_readme_block(data: Mapping[str, Any]) -> str:
    """The README's figures block: what each quick-start command takes and prints."""
    tests, suite, demo, tiny = (_need(data, k) for k in ("tests", "suite", "demo", "tiny"))
    if suite["count"] == tests["count"]:
        suite_text = f"{tests['count']} tests in {duration(suite['seconds'])} ({suite['date']})"
    else:
        suite_text = (f"{tests['count']} tests ({tests['date']}); the suite took {duration(suite['seconds'])} "
                      f"when it had {suite['count']} ({suite['date']})")
    ta, lw = tiny[BASELINE], tiny[LEARNED]
    lines = [
        f"Wall times on {demo['nproc']} CPU cores ({demo['date']}, measured by `scripts/readme_figures.py`):",
        "",
        "| command | takes | prints |",
        "|---|---|---|",
        f"| `adamerge demo` | {duration(demo['first_seconds'])} on a fresh cache (about "
        f"{duration(demo['first_seconds'] - demo['cached_seconds'])} of it builds the suite, cached for next "
        f"time), {duration(demo['cached_seconds'])} after | a line per method, then the table below; writes "
        f"`runs/demo/results.json`, `results.md`, heatmaps |",
        f"| the test command | {suite_text}, plus the install | a dot per test, then the count passed |",
        f"| `adamerge fit --config configs/tiny.yaml` | {duration(tiny['first_seconds'])} on a fresh cache "
        f"(about {duration(tiny['first_seconds'] - tiny['cached_seconds'])} of it builds the tiny suite), "
        f"{duration(tiny['cached_seconds'])} after | one line: steps, `val/acc_avg`, checkpoint, TensorBoard folder |",
        "",
        f"On the tiny suite layer-wise AdaMerging ({lw:.1f} %) {verdict(lw, ta)} task arithmetic ({ta:.1f} %); it "
        "tests code paths, the demo suite compares methods.",
        "",
        "The end of `adamerge demo`'s output (top-1 % on each task's test split; `norm`: % of the",
        "individual experts' accuracy; the numbers are the same run to run):",
        "",
        "```text",
        *demo["table"],
        "```",
    ]
    return "\n".join(lines)


def verdict(adamerging: float, task_arithmetic: float) -> str:
    return "does not beat" if adamerging <= task_arithmetic else "beats"


def render_pyproject(data: Mapping[str, Any]) -> str:
    suite = _need(data, "suite")
    return (f"# two workers of one thread each (tests/conftest.py): {suite['count']} tests in "
            f"{duration(suite['seconds'])} on {suite['nproc']} cores ({suite['date']})")


def render_tiny(data: Mapping[str, Any]) -> str:
    tiny = _need(data, "tiny")
    ta, lw = tiny[BASELINE], tiny[LEARNED]
    text = (f"Measured on {tiny['nproc']} CPU cores ({tiny['date']}): this command takes "
            f"{duration(tiny['first_seconds'], NBSP)} on a fresh cache, of which about "
            f"{duration(tiny['first_seconds'] - tiny['cached_seconds'], NBSP)} build the suite (once), and "
            f"{duration(tiny['cached_seconds'], NBSP)} once the suite is cached. Here layer-wise AdaMerging ({lw:.1f} % "
            f"average after {tiny['steps']} steps) {verdict(lw, ta)} task arithmetic ({ta:.1f} %, scaling "
            f"{tiny['ta_scaling']} picked on val; adamerge compare --config configs/tiny.yaml): this suite tests "
            "code paths; compare methods on the demo suite (adamerge demo).")
    for keep in ("adamerge compare --config configs/tiny.yaml", "adamerge demo"):
        text = text.replace(keep, keep.replace(" ", NBSP))
    return textwrap.fill(text, width=100, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False).replace(NBSP, " ")


def stored_block(data: Mapping[str, Any]) -> str:
    """The figures block with the stored data appended (what goes between the README markers)."""
    stored = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}"
    return render_readme_block(data) + "\n<!-- figures-data\n" + stored + "\n-->"


TARGETS: dict[str, tuple[str, str, Callable[[Mapping[str, Any]], str]]] = {
    README: (MD_START, MD_END, stored_block),
    PYPROJECT: (HASH_START, HASH_END, render_pyproject),
    TINY: (HASH_START, HASH_END, render_tiny),
}


def rendered(root: Path, data: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{file: (current text, text with the figures of ``data``)} for every target file."""
    out = {}
    for name, (start, end, render) in TARGETS.items():
        path = root / name
        if not path.is_file():
            raise FiguresError(f"{name}: not found under {root}")
        text = path.read_text()
        out[name] = (text, replace_block(text, start, end, render(data), name))
    return out


def check_markers(root: Path) -> None:
    """Raise ``FiguresError`` naming the first target file that is missing or lacks its markers."""
    for name, (start, end, _) in TARGETS.items():
        path = root / name
        if not path.is_file():
            raise FiguresError(f"{name}: not found under {root}")
        replace_block(path.read_text(), start, end, "", name)


def write(root: Path, data: Mapping[str, Any]) -> list[str]:
    """Write the figures of ``data`` into every target (all files checked before any is written);
    returns the names of the files that changed."""
    texts = rendered(root, data)
    changed = [name for name, (old, new) in texts.items() if old != new]
    for name in changed:
        (root / name).write_text(texts[name][1])
    return changed


# ---------------------------------------------------------------------------------------------
# measuring


def stamp() -> dict[str, Any]:
    """When and where: the date, ``nproc`` and the 1-minute load average (above nproc: other work
    shared the cores, and the wall times are inflated)."""
    return {"date": datetime.date.today().isoformat(), "nproc": os.cpu_count(),
            "load": round(os.getloadavg()[0], 2)}


def timed(cmd: list[str], env: Mapping[str, str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of ``cmd``; raises with its stderr's end if it fails."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    print(f"  {seconds:.1f} s", flush=True)
    return seconds, res.stdout


def count_tests(root: Path, python: str) -> int:
    """The number of tests pytest collects (``-q`` prints one per line, ``-qq`` a count per file)."""
    _, out = timed([python, "-m", "pytest", "--collect-only", "-q", "-n", "0"], os.environ, root)
    per_file = re.findall(r"^\S+\.py: (\d+)$", out, re.M)
    if per_file:
        return sum(int(n) for n in per_file)
    return sum(1 for line in out.splitlines() if "::" in line)


def measure_suite(root: Path, python: str, count: int, work: Path) -> dict[str, Any]:
    env = {**os.environ, "ADAMERGE_CACHE": str(work / "cache-suite")}
    seconds, _ = timed([python, "-m", "pytest"], env, root)
    return {"count": count, "seconds": round(seconds, 1), **stamp()}


def measure_demo(root: Path, adamerge: str, work: Path) -> dict[str, Any]:
    from adamerge.report import terminal_table
    env = {**os.environ, "ADAMERGE_CACHE": str(work / "cache-demo")}
    first, _ = timed([adamerge, "demo", "--out", str(work / "demo1")], env, root)
    cached, _ = timed([adamerge, "demo", "--out", str(work / "demo2")], env, root)
    results = json.loads((work / "demo1" / "results.json").read_text())
    table = terminal_table(results).splitlines() + ["", "wrote runs/demo/results.json and runs/demo/results.md"]
    return {"first_seconds": round(first, 1), "cached_seconds": round(cached, 1),
            "avg": {m: round(r["avg"], 1) for m, r in results["methods"].items()}, "table": table, **stamp()}


def measure_tiny(root: Path, adamerge: str, work: Path) -> dict[str, Any]:
    env = {**os.environ, "ADAMERGE_CACHE": str(work / "cache-tiny")}
    fit = [adamerge, "fit", "--config", "configs/tiny.yaml"]
    first, _ = timed(fit + ["--trainer.default_root_dir", str(work / "tiny1")], env, root)
    cached, out = timed(fit + ["--trainer.default_root_dir", str(work / "tiny2")], env, root)
    line = [x for x in out.splitlines() if x.startswith("adamerge fit:")][-1]
    fit_acc = float(re.search(r"val/acc_avg ([\d.]+)", line).group(1))
    steps = int(re.search(r"adamerge fit: (\d+) steps", line).group(1))
    timed([adamerge, "compare", "--config", "configs/tiny.yaml", "--methods", BASELINE, LEARNED,
           "--out", str(work / "compare")], env, root)
    results = json.loads((work / "compare" / "results.json").read_text())
    avg = {m: round(r["avg"], 1) for m, r in results["methods"].items()}
    return {"first_seconds": round(first, 1), "cached_seconds": round(cached, 1), "steps": steps,
            "fit_val_acc_avg": round(fit_acc, 2), BASELINE: avg[BASELINE], LEARNED: avg[LEARNED],
            "ta_scaling": results.get("tuned", {}).get(BASELINE, {}).get(
                "scaling", results["hparams"][BASELINE]["scaling"]),
            **stamp()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    p.add_argument("--skip-suite", action="store_true", help="reuse the stored test-suite time (the count is "
                   "still measured)")
    p.add_argument("--skip-tests", action="store_true", help="reuse the stored test count")
    p.add_argument("--skip-demo", action="store_true", help="reuse the stored adamerge demo figures")
    p.add_argument("--skip-tiny", action="store_true", help="reuse the stored configs/tiny.yaml figures")
    p.add_argument("--render", action="store_true", help="measure nothing; write the stored figures")
    p.add_argument("--check", action="store_true", help="measure and write nothing; exit 1 if a file differs "
                   "from what --render would write")
    args = p.parse_args(argv)
    root = args.root.resolve()
    try:
        data = read_data((root / README).read_text()) if (root / README).is_file() else None
        if data is None:
            raise FiguresError(f"{README}: not found under {root}")
        if args.check:
            stale = [name for name, (old, new) in rendered(root, data).items() if old != new]
            for name in stale:
                print(f"{name}: figures differ from the stored data; run python scripts/readme_figures.py --render")
            return 1 if stale else 0
        check_markers(root)  # refuse before measuring anything
        if not args.render:
            python = sys.executable
            adamerge = str(Path(python).with_name("adamerge"))
            parent = os.environ.get("ADAMERGE_CACHE")  # fresh caches go under it when it is set
            if parent:
                Path(parent).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="readme-figures-", dir=parent) as tmp:
                work = Path(tmp)
                if not args.skip_tests:
                    data["tests"] = {"count": count_tests(root, python), **stamp()}
                if not args.skip_suite:
                    data["suite"] = measure_suite(root, python, data["tests"]["count"], work)
                if not args.skip_demo:
                    data["demo"] = measure_demo(root, adamerge, work)
                if not args.skip_tiny:
                    data["tiny"] = measure_tiny(root, adamerge, work)
            print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in data.items()},
                             indent=1))
        changed = write(root, data)
        print("rewrote " + (", ".join(changed) if changed else "nothing (already up to date)"))
        return 0
    except FiguresError as e:
        print(f"readme_figures: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
