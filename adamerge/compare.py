"""The comparison: methods of the registry on one model pool, and the results report.

Which methods exist, their kinds and defaults come from :mod:`adamerge.methods.registry`; this
module runs each kind (static merges with optional grid search on a labeled split, per-task
models, learned modules trained with a Lightning ``Trainer``) and writes the report
(:mod:`adamerge.report`). ``adamerge demo`` and ``adamerge compare`` call :func:`compare`.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch

from .data.datamodule import MultiTaskDataModule
from .methods import registry
from .models.pool import LoadedPool, PreloadedPool
from .report import (CoefficientHeatmap, StepProgressBar, build_results, evaluate, quiet_lightning, summarize,
                     terminal_table, write_results)


@dataclass
class CompareSettings:
    """How the comparison runs; every method's own defaults come from the registry.

    Attributes:
        steps: optimizer steps of learned methods.
        val_split: labeled split on which static methods pick their tunable hyper-parameters
            (``Method.tune``); ``None``: no search, the defaults are used.
        hparams: method -> hyper-parameters overriding its registry defaults, e.g.
            ``{"task_arithmetic": {"scaling": 0.3}}`` (a tunable one given here is fixed, not
            searched).
        grids: method -> hyper-parameter -> grid, replacing the registry's ``tune`` grids.
        accelerator: Lightning accelerator for learned methods.
        seed: global seed set before each learned method is built (random initialisations such
            as Surgery's adapters), so a row does not depend on which rows ran before it.
        schedules: learned row -> ``{"batch_size", "steps"}`` replacing the data module's batch
            (images per task per step) and ``steps`` for that row (``--protocol paper``: each
            row's official recipe); rows not named use the common ones.
        extra: more entries for the report's ``settings``.
    """

    steps: int = 500
    val_split: str | None = "val"
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    grids: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    accelerator: str = "cpu"
    seed: int = 0
    schedules: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Every named method and hyper-parameter exists (one-line errors naming the key)."""
        for table in (self.hparams, self.grids):
            for name, values in table.items():
                registry.get(name).resolve({k: None for k in values})


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Bench:
    """What every kind's runner sees: the pool, the data, the evaluation sets and settings."""

    loaded: LoadedPool
    datamodule: MultiTaskDataModule
    settings: CompareSettings
    out: Path
    eval_sets: dict[str, Any]
    val_sets: dict[str, Any] | None
    say: Callable[[str], None]
    final_checkpoints: dict[str, Path] = field(default_factory=dict)  # learned row -> its checkpoint

    def __post_init__(self) -> None:
        encoder, tv = self.loaded.encoder, self.loaded.task_vectors
        self.task_vectors = tv.to_dense() if hasattr(tv, "to_dense") else tv  # LoRA: static merges take dense
        self.heads = {**self.loaded.heads, **self.loaded.unseen_heads}
        self.base = {n: p.detach() for n, p in encoder.named_parameters()}

    def evaluate(self, params: Mapping[str, Any], sets: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Per-task accuracy of the base encoder with ``params`` (each task's head)."""
        return evaluate(self.loaded.encoder, params, self.heads, self.eval_sets if sets is None else sets,
                        self.datamodule.eval_batch_size)

    def grids(self, method: registry.Method, fixed: Mapping[str, Any]) -> dict[str, tuple]:
        """The hyper-parameters of ``method`` to pick on the labeled split (none without one)."""
        if not self.val_sets:
            return {}
        return {k: g for k, g in {**method.tune, **self.settings.grids.get(method.name, {})}.items()
                if k not in fixed}


def one_model(method: registry.Method, loaded: LoadedPool, datamodule: MultiTaskDataModule,
              hp: Mapping[str, Any], dense: Any = None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one model of a static or fitted row with hyper-parameters ``hp``, as the encoder
    parameters it sets (``compare`` and ``adamerge export --method``). ``dense`` / ``base``: the
    dense task vectors and base parameters when the caller already has them (a grid search)."""
    if method.kind == "static":
        tv = dense if dense is not None else loaded.task_vectors
        tv = tv.to_dense() if hasattr(tv, "to_dense") else tv
        base = base if base is not None else {n: p.detach() for n, p in loaded.encoder.named_parameters()}
        return method.build(tv, base, **hp)
    if method.kind == "fitted":  # labeled shots from another split, when the row declares them
        data = datamodule.with_options(**method.data) if method.data else datamodule
        return method.build(loaded, {t: data.adaptation_dataset(t) for t in loaded.task_vectors.task_names}, **hp)
    raise ValueError(f"{method.name} is a {method.kind} method: it has no single merged model")


def grid_models(method: registry.Method, bench: Bench, hp: Mapping[str, Any],
                grids: Mapping[str, tuple]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(grid point, the row's model there)`` over every point of ``grids``. A row linear in a
    gridded hyper-parameter (``Method.linear``, e.g. ``scaling``) is merged once per point of the
    others, as ``delta`` with a zero base, and each of its values is ``base + value * delta``."""
    key = method.linear if method.linear in grids else None
    others = [k for k in grids if k != key]
    if key is not None and min(grids[key]) < 0:  # the row's own check of the value (MagMax, PCB refuse it)
        one_model(method, bench.loaded, bench.datamodule, {**hp, key: min(grids[key])}, bench.task_vectors, bench.base)
    zero = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in bench.base.items()} if key else {}
    for rest in itertools.product(*(grids[k] for k in others)):
        point = {**hp, **dict(zip(others, rest))}
        if key is None:
            yield dict(zip(others, rest)), one_model(method, bench.loaded, bench.datamodule, point,
                                                     bench.task_vectors, bench.base)
            continue
        delta = one_model(method, bench.loaded, bench.datamodule, {**point, key: 1.0}, bench.task_vectors, zero)
        for value in grids[key]:
            chosen = {**dict(zip(others, rest)), key: value}
            yield ({k: chosen[k] for k in grids},
                   {n: (bench.base[n].float() + value * d).to(bench.base[n].dtype) for n, d in delta.items()})


def run_one_model(bench: Bench, method: registry.Method, hp: dict[str, Any],
                  fixed: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Static and fitted rows: one model; ``tune`` grids picked on the labeled split."""
    grids, tuned = bench.grids(method, fixed), {}
    if grids:
        best, best_acc = None, -1.0
        for point in grid_models(method, bench, hp, grids):
            accs = bench.evaluate(point[1], bench.val_sets)
            avg = sum(accs.values()) / len(accs)
            if avg > best_acc:
                best, best_acc = point[0], avg
        tuned = best
        bench.say(f"  {method.name}: {', '.join(f'{k} {v}' for k, v in best.items())} picked on the "
                  f"'{bench.settings.val_split}' split (val avg {best_acc:.1f})")
        hp.update(tuned)
    return bench.evaluate(one_model(method, bench.loaded, bench.datamodule, hp, bench.task_vectors, bench.base)), tuned


def run_per_task(bench: Bench, method: registry.Method, hp: dict[str, Any],
                 fixed: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-task rows: each task evaluated with its own model; a tuned value is picked per task
    on that task's labeled split (``{hparam: {task: value}}``)."""
    grids, tuned = bench.grids(method, fixed), {}
    if grids:
        best: dict[str, tuple[float, tuple]] = {}
        for point in itertools.product(*grids.values()):
            for t, params in method.build(bench.loaded, **{**hp, **dict(zip(grids, point))}).items():
                acc = bench.evaluate(params(), {t: bench.val_sets[t]})[t]
                if t not in best or acc > best[t][0]:
                    best[t] = (acc, point)
        tuned = {k: {t: best[t][1][i] for t in best} for i, k in enumerate(grids)}
        bench.say(f"  {method.name}: " + "; ".join(f"{k} " + ", ".join(f"{t} {v}" for t, v in vals.items())
                                                   for k, vals in tuned.items())
                  + f" picked per task on the '{bench.settings.val_split}' split")
        hp.update(tuned)
    accs: dict[str, float] = {}
    for t, params in method.build(bench.loaded, **hp).items():
        accs.update(bench.evaluate(params(), {t: bench.eval_sets[t]}))
    return accs, tuned


def run_learned(bench: Bench, method: registry.Method, hp: dict[str, Any],
                fixed: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Learned rows: a Lightning ``Trainer`` on the unlabeled adaptation stream, then the final
    checkpoint (``runs/<row>/final.ckpt``) and the per-task accuracy of the module."""
    s, out, name = bench.settings, bench.out, method.name
    if method.starts_from and "init_from" not in fixed:
        hp["init_from"] = str(bench.final_checkpoints[method.starts_from])
    L.seed_everything(s.seed, verbose=False)
    model = method.build(PreloadedPool(bench.loaded), **hp)
    if not model.learns:  # training-free (e.g. SMILE): evaluated as built
        return model.accuracies(bench.eval_sets, bench.datamodule.eval_batch_size), {}
    schedule = s.schedules.get(name, {})
    steps = int(schedule.get("steps", s.steps))
    options = {**({"batch_size": schedule["batch_size"]} if "batch_size" in schedule else {}), **method.data}
    data = bench.datamodule.with_options(**options) if options else bench.datamodule
    with quiet_lightning():  # hides Lightning's tips and the frozen base's eval-mode warning
        trainer = L.Trainer(default_root_dir=out / "runs" / name, max_steps=steps,
                            accelerator=s.accelerator, devices=1, limit_val_batches=0,
                            check_val_every_n_epoch=None, val_check_interval=steps + 1,
                            log_every_n_steps=10, enable_model_summary=False,
                            enable_checkpointing=False,
                            callbacks=[registry.RecordRow(), StepProgressBar(),
                                       CoefficientHeatmap(str(out / f"coefficients_{name}.png"))],
                            logger=L.pytorch.loggers.TensorBoardLogger(out / "runs", name=name))
        trainer.fit(model, data)
        bench.final_checkpoints[name] = out / "runs" / name / "final.ckpt"
        # what Lightning's default saves (naming it drops Lightning's 'not set' notice); the
        # module's on_save_checkpoint keeps only its learned tensors of the state dict
        trainer.save_checkpoint(bench.final_checkpoints[name], weights_only=False)
    return model.accuracies(bench.eval_sets, bench.datamodule.eval_batch_size), {}


# kind -> runner: ``(bench, method, hparams, fixed) -> (per-task accuracy, tuned values)``
RUNNERS: dict[str, Callable[..., tuple[dict[str, float], dict[str, Any]]]] = {
    "static": run_one_model, "fitted": run_one_model, "per_task": run_per_task, "learned": run_learned}


def compare(loaded: LoadedPool, datamodule: MultiTaskDataModule, out: Path,
            settings: CompareSettings | None = None, methods: Sequence[str] | None = None,
            suite: str = "custom", say: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``methods`` (default: the registry's demo methods) on ``loaded`` with
    ``datamodule``'s data; write ``results.json``, ``results.md`` and heatmaps to ``out``."""
    s = settings or CompareSettings()
    unknown = [m for m in (methods or ()) if m not in registry.REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {registry.names()}")
    requested = registry.select(methods)
    methods = registry.with_prerequisites(requested)
    for name in methods:
        if name not in requested:
            say(f"{name} runs first: {', '.join(m for m in requested if registry.get(m).starts_from == name)} "
                "starts from its coefficients")
    s.check()
    tasks, unseen = loaded.task_vectors.task_names, loaded.unseen_tasks
    datamodule.select_tasks(tasks, unseen)  # match data to heads by task name
    out = Path(out)
    eval_sets = {t: datamodule.eval_dataset(t) for t in loaded.eval_tasks}
    # hyper-parameters are picked on the merged tasks only: unseen tasks stay unseen
    val_sets = {t: datamodule.dataset(t, s.val_split) for t in tasks} if s.val_split else None
    bench = Bench(loaded, datamodule, s, out, eval_sets, val_sets, say)
    rows: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    tuned: dict[str, dict[str, Any]] = {}
    used: dict[str, dict[str, Any]] = {}

    for i, name in enumerate(methods, 1):
        t0 = time.perf_counter()
        say(f"[{i}/{len(methods)}] {name}")
        method = registry.get(name)
        fixed = s.hparams.get(name, {})
        hp = method.resolve(fixed)
        rows[name], picked = RUNNERS[method.kind](bench, method, hp, fixed)
        if picked:
            tuned[name] = picked
        used[name] = {**hp, **({"data": dict(method.data)} if method.data else {})}
        timings[name] = time.perf_counter() - t0
        row = summarize(rows[name], None, unseen)
        say(f"  {name}: avg {row['avg']:.1f}" + (f", unseen avg {row['avg_unseen']:.1f}" if row.get("avg_unseen") is not None else "")
            + f" ({timings[name]:.1f} s)")

    individual = rows.get("individual")
    results = build_results(
        suite=suite, tasks=tasks, unseen=unseen,
        methods={m: summarize(rows[m], individual, unseen) for m in methods},
        descriptions={m: registry.get(m).description for m in methods},
        profiles={m: registry.get(m).profile() for m in methods},
        hparams=used, tuned=tuned,
        settings={"steps": s.steps, "val_split": s.val_split, "seed": s.seed,
                  "batch_size": datamodule.batch_size,
                  "adapt_split": datamodule.adapt_split, "eval_split": datamodule.eval_split,
                  **({"corruption": datamodule.corruption, "severity": datamodule.severity}
                     if datamodule.corruption else {}),
                  **s.extra},
        seconds=timings, commit=_git_commit())
    json_path, md_path = write_results(results, out)
    say("\n" + terminal_table(results))
    say(f"\nwrote {json_path} and {md_path}")
    return results
