#!/usr/bin/env python
"""Merge time of a static row's grid search, one merge per grid point against one merge per point
of the hyper-parameters the row is not linear in (``Method.linear``: ``base + scaling * delta``).

    python scripts/bench_grid.py [--suite demo | --dim 384 --depth 6 --tasks 8] [--methods ties della ...]

For each row, ``adamerge.compare.grid_models`` runs over the row's ``tune`` grid twice on a pool:
the built-in suite's (``--suite``, built or read from ``$ADAMERGE_CACHE``), or with ``--dim`` a random
TinyViT of that width and ``--depth`` blocks with ``--tasks`` experts (the base plus Gaussian noise
of std 0.01; nothing is trained, only the merges' cost matters): with ``linear`` switched off (every point
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

import torch

from adamerge.compare import grid_models
from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import registry
from adamerge.models.pool import LoadedPool
from adamerge.suites.synthetic import SuitePool, TinyViT


def random_pool(dim: int, depth: int, tasks: int) -> LoadedPool:
    """A random TinyViT (``dim`` wide, ``depth`` blocks) and ``tasks`` noisy copies of it."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = TinyViT(dim=dim, depth=depth, heads=max(1, dim // 64), out_dim=dim)
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = {f"t{i}": {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for i in range(tasks)}
    tv = TaskVectors.from_state_dicts(base, experts, names=[n for n, _ in encoder.named_parameters()])
    return LoadedPool(encoder, tv, {t: torch.nn.Identity() for t in experts})


def main() -> None:
    linear = [n for n in registry.names("static") if registry.get(n).linear]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="demo", help="built-in suite whose pool is merged (default demo)")
    p.add_argument("--dim", type=int, default=None, help="merge a random TinyViT of this width instead of a suite")
    p.add_argument("--depth", type=int, default=6, help="--dim: its blocks (default 6)")
    p.add_argument("--tasks", type=int, default=8, help="--dim: its experts (default 8)")
    p.add_argument("--methods", nargs="+", default=linear, choices=linear, metavar="ROW",
                   help=f"static rows with a linear hyper-parameter (default all: {', '.join(linear)})")
    args = p.parse_args()
    loaded = random_pool(args.dim, args.depth, args.tasks) if args.dim else SuitePool(args.suite).load()
    size = sum(t[0].numel() for t in loaded.task_vectors.tensors)
    print(f"pool: {size / 1e6:.1f} M merged entries per task, K = {loaded.task_vectors.num_tasks}", flush=True)
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
