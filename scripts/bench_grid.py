#!/usr/bin/env python
"""Merge time of a static row's grid search, one merge per grid point against one merge per point
of the hyper-parameters the row is not linear in (``Method.linear``: ``base + scaling * delta``).

    python scripts/bench_grid.py [--suite demo] [--methods ties della pcb magmax tsv_m]

For each row, ``adamerge.compare.grid_models`` runs over the row's ``tune`` grid twice on the
suite's pool (built or read from ``$ADAMERGE_CACHE``): with ``linear`` switched off (every point
merged) and as registered (``delta`` merged once, each point rescaled). Only the merges are timed,
not the evaluations that follow each point in ``compare``. Both runs share the process, so their
ratio is the figure to read. One untimed merge runs first, so the SVD rows' memoised factors serve
both runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace

from adamerge.compare import grid_models
from adamerge.methods import registry
from adamerge.suites.synthetic import SuitePool


def main() -> None:
    linear = [n for n in registry.names("static") if registry.get(n).linear]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="demo", help="built-in suite whose pool is merged (default demo)")
    p.add_argument("--methods", nargs="+", default=linear, choices=linear, metavar="ROW",
                   help=f"static rows with a linear hyper-parameter (default all: {', '.join(linear)})")
    args = p.parse_args()
    loaded = SuitePool(args.suite).load()
    bench = SimpleNamespace(loaded=loaded, datamodule=None, task_vectors=loaded.task_vectors,
                            base={n: t.detach() for n, t in loaded.encoder.named_parameters()})
    for name in args.methods:
        row = registry.get(name)
        next(grid_models(row, bench, row.defaults(), dict(row.tune)))  # untimed: fills the SVD rows' memo
        seconds = []
        for variant in (dataclasses.replace(row, linear=None), row):
            start = time.perf_counter()
            points = sum(1 for _ in grid_models(variant, bench, row.defaults(), dict(row.tune)))
            seconds.append(time.perf_counter() - start)
        print(f"{name}: {points} grid points, merges {seconds[0]:.2f} s -> {seconds[1]:.2f} s "
              f"({seconds[0] / max(seconds[1], 1e-9):.1f}x)", flush=True)


if __name__ == "__main__":
    main()
