"""Run every merging method on one model pool and write the results report.

Rows: ``base`` and ``individual`` (references), the static merges ``weight_averaging``,
``task_arithmetic``, ``ties``, and ``adamerging_taskwise``, ``adamerging_layerwise``,
``adamerging_layerwise_pp`` (AdaMerging++: TIES-trimmed task vectors).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from .adamerging import AdaMerging
from .data import MultiTaskDataModule
from .merge_methods import METHODS
from .pool import LoadedPool, PreloadedPool
from .report import CoefficientHeatmap, evaluate, summarize, terminal_table, write_results

ALL_METHODS = ("base", "individual", "weight_averaging", "task_arithmetic", "ties",
               "adamerging_taskwise", "adamerging_layerwise", "adamerging_layerwise_pp")

ADAMERGING_VARIANTS: dict[str, dict[str, Any]] = {
    "adamerging_taskwise": {"granularity": "taskwise"},
    "adamerging_layerwise": {"granularity": "layerwise"},
    "adamerging_layerwise_pp": {"granularity": "layerwise", "trim": 0.2},
}


@dataclass
class CompareSettings:
    """Hyper-parameters of the comparison (paper defaults for AdaMerging).

    Attributes:
        steps, lr, prior: AdaMerging's Adam steps, learning rate and initial coefficient.
        ta_scaling / ties_scaling: fixed lambdas; ``None`` picks them on ``val_split`` from the grids.
        val_split: labeled split for picking lambdas (``None``: use the fixed defaults 0.3 / 1.0).
        ties_keep: fraction kept by TIES trimming (also used by AdaMerging++).
    """

    steps: int = 500
    lr: float = 1e-3
    prior: float = 0.3
    ta_scaling: float | None = None
    ties_scaling: float | None = None
    ties_keep: float = 0.2
    val_split: str | None = "val"
    ta_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
    ties_grid: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))
    accelerator: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def compare(loaded: LoadedPool, datamodule: MultiTaskDataModule, out: Path,
            settings: CompareSettings | None = None, methods: tuple[str, ...] = ALL_METHODS,
            suite: str = "custom", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``methods`` on ``loaded`` with ``datamodule``'s data; write the report to ``out``."""
    s = settings or CompareSettings()
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(ALL_METHODS)}")
    tasks = loaded.task_vectors.task_names
    datamodule.select_tasks(tasks)  # match data to heads by task name
    out = Path(out)
    eval_sets = {t: datamodule.dataset(t, datamodule.eval_split) for t in tasks}
    val_sets = {t: datamodule.dataset(t, s.val_split) for t in tasks} if s.val_split else None
    encoder, heads, tv = loaded.encoder, loaded.heads, loaded.task_vectors
    base = {n: p.detach() for n, p in encoder.named_parameters()}
    ev = lambda params, sets=eval_sets: evaluate(encoder, params, heads, sets, datamodule.eval_batch_size)
    rows: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    chosen: dict[str, float] = {}

    def pick(name: str, grid: tuple[float, ...], fn: Callable[[float], dict]) -> float:
        best, best_acc = grid[0], -1.0
        for lam in grid:
            accs = ev(fn(lam), val_sets)
            avg = sum(accs.values()) / len(accs)
            if avg > best_acc:
                best, best_acc = lam, avg
        say(f"  {name}: scaling {best} picked on the '{s.val_split}' split (val avg {best_acc:.1f})")
        return best

    for i, m in enumerate(methods, 1):
        t0 = time.perf_counter()
        say(f"[{i}/{len(methods)}] {m}")
        if m == "base":
            rows[m] = ev(None)
        elif m == "individual":
            rows[m] = {}
            for t in tasks:
                rows[m].update(evaluate(encoder, loaded.expert_state[t](), heads, {t: eval_sets[t]},
                                        datamodule.eval_batch_size))
        elif m == "weight_averaging":
            rows[m] = ev(METHODS[m](tv, base))
        elif m == "task_arithmetic":
            lam = s.ta_scaling if s.ta_scaling is not None else (
                pick(m, s.ta_grid, lambda x: METHODS[m](tv, base, scaling=x)) if val_sets else 0.3)
            chosen[m] = lam
            rows[m] = ev(METHODS[m](tv, base, scaling=lam))
        elif m == "ties":
            lam = s.ties_scaling if s.ties_scaling is not None else (
                pick(m, s.ties_grid, lambda x: METHODS[m](tv, base, keep=s.ties_keep, scaling=x))
                if val_sets else 1.0)
            chosen[m] = lam
            rows[m] = ev(METHODS[m](tv, base, keep=s.ties_keep, scaling=lam))
        else:
            opts = dict(ADAMERGING_VARIANTS[m])
            if "trim" in opts:
                opts["trim"] = s.ties_keep
            model = AdaMerging(PreloadedPool(loaded), prior=s.prior, lr=s.lr, **opts)
            trainer = L.Trainer(default_root_dir=out / "runs" / m, max_steps=s.steps,
                                accelerator=s.accelerator, devices=1, limit_val_batches=0,
                                check_val_every_n_epoch=None, val_check_interval=s.steps + 1,
                                log_every_n_steps=10, enable_model_summary=False,
                                enable_checkpointing=False,
                                callbacks=[CoefficientHeatmap(str(out / f"coefficients_{m}.png"))],
                                logger=L.pytorch.loggers.TensorBoardLogger(out / "runs", name=m))
            trainer.fit(model, datamodule)
            with torch.no_grad():
                rows[m] = ev({k: v.detach() for k, v in model.merged.merged_parameters().items()})
        timings[m] = time.perf_counter() - t0
        say(f"  {m}: avg {sum(rows[m].values()) / len(rows[m]):.1f} ({timings[m]:.1f} s)")

    individual = rows.get("individual")
    results = {"suite": suite, "tasks": list(tasks),
               "methods": {m: summarize(rows[m], individual) for m in methods},
               "chosen_scaling": chosen,
               "settings": {"steps": s.steps, "lr": s.lr, "prior": s.prior, "ties_keep": s.ties_keep,
                            "val_split": s.val_split, "batch_size": datamodule.batch_size,
                            "adapt_split": datamodule.adapt_split, "eval_split": datamodule.eval_split,
                            **s.extra},
               "seconds": {m: round(v, 2) for m, v in timings.items()},
               "commit": _git_commit()}
    json_path, md_path = write_results(results, out)
    say("\n" + terminal_table(results))
    say(f"\nwrote {json_path} and {md_path}")
    return results
