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
from typing import Any, Callable, Mapping, Sequence

import lightning as L

from .data.datamodule import MultiTaskDataModule
from .methods import registry
from .models.pool import LoadedPool, PreloadedPool
from .report import (CoefficientHeatmap, build_results, evaluate, quiet_lightning, summarize, terminal_table,
                     write_results)


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
        extra: more entries for the report's ``settings``.
    """

    steps: int = 500
    val_split: str | None = "val"
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    grids: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    accelerator: str = "cpu"
    seed: int = 0
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
    encoder, tv = loaded.encoder, loaded.task_vectors
    if hasattr(tv, "to_dense"):  # LoRA experts: static merges (TA, TIES, ...) take dense vectors
        tv = tv.to_dense()
    heads = {**loaded.heads, **loaded.unseen_heads}
    base = {n: p.detach() for n, p in encoder.named_parameters()}
    ev = lambda params, sets=eval_sets: evaluate(encoder, params, heads, sets, datamodule.eval_batch_size)
    rows: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    tuned: dict[str, dict[str, Any]] = {}
    used: dict[str, dict[str, Any]] = {}
    final_checkpoints: dict[str, Path] = {}  # learned method -> its checkpoint after training

    def pick(method: registry.Method, hp: dict[str, Any], grids: Mapping[str, tuple]) -> dict[str, Any]:
        """The grid point with the best average accuracy on the validation split."""
        best, best_acc = None, -1.0
        for point in itertools.product(*grids.values()):
            trial = {**hp, **dict(zip(grids, point))}
            accs = ev(method.build(tv, base, **trial), val_sets)
            avg = sum(accs.values()) / len(accs)
            if avg > best_acc:
                best, best_acc = dict(zip(grids, point)), avg
        picked = ", ".join(f"{k} {v}" for k, v in best.items())
        say(f"  {method.name}: {picked} picked on the '{s.val_split}' split (val avg {best_acc:.1f})")
        return best

    def pick_per_task(method: registry.Method, hp: dict[str, Any], grids: Mapping[str, tuple]) -> dict[str, Any]:
        """Per task, the grid point whose model of that task is best on that task's validation
        split: ``{hparam: {task: value}}`` (a per-task method takes a value or a task mapping)."""
        best: dict[str, tuple[float, tuple]] = {}
        for point in itertools.product(*grids.values()):
            for t, params in method.build(loaded, **{**hp, **dict(zip(grids, point))}).items():
                acc = evaluate(encoder, params(), heads, {t: val_sets[t]}, datamodule.eval_batch_size)[t]
                if t not in best or acc > best[t][0]:
                    best[t] = (acc, point)
        picked = {k: {t: best[t][1][i] for t in best} for i, k in enumerate(grids)}
        say(f"  {method.name}: " + "; ".join(f"{k} " + ", ".join(f"{t} {v}" for t, v in vals.items())
                                              for k, vals in picked.items())
            + f" picked per task on the '{s.val_split}' split")
        return picked

    for i, name in enumerate(methods, 1):
        t0 = time.perf_counter()
        say(f"[{i}/{len(methods)}] {name}")
        method = registry.get(name)
        fixed = s.hparams.get(name, {})
        hp = method.resolve(fixed)
        if method.kind == "static":
            grids = {k: g for k, g in {**method.tune, **s.grids.get(name, {})}.items() if k not in fixed}
            if grids and val_sets:
                tuned[name] = pick(method, hp, grids)
                hp.update(tuned[name])
            rows[name] = ev(method.build(tv, base, **hp))
        elif method.kind == "per_task":
            grids = {k: g for k, g in {**method.tune, **s.grids.get(name, {})}.items() if k not in fixed}
            if grids and val_sets:
                tuned[name] = pick_per_task(method, hp, grids)
                hp.update(tuned[name])
            rows[name] = {}
            for t, params in method.build(loaded, **hp).items():
                rows[name].update(evaluate(encoder, params(), heads, {t: eval_sets[t]},
                                           datamodule.eval_batch_size))
        else:
            if method.starts_from and "init_from" not in fixed:
                hp["init_from"] = str(final_checkpoints[method.starts_from])
            L.seed_everything(s.seed, verbose=False)
            model = method.build(PreloadedPool(loaded), **hp)
            data = datamodule.with_options(**method.data) if method.data else datamodule
            with quiet_lightning():  # hides Lightning's tips and the frozen base's eval-mode warning
                trainer = L.Trainer(default_root_dir=out / "runs" / name, max_steps=s.steps,
                                    accelerator=s.accelerator, devices=1, limit_val_batches=0,
                                    check_val_every_n_epoch=None, val_check_interval=s.steps + 1,
                                    log_every_n_steps=10, enable_model_summary=False,
                                    enable_checkpointing=False,
                                    callbacks=[CoefficientHeatmap(str(out / f"coefficients_{name}.png"))],
                                    logger=L.pytorch.loggers.TensorBoardLogger(out / "runs", name=name))
                trainer.fit(model, data)
                final_checkpoints[name] = out / "runs" / name / "final.ckpt"
                # what Lightning's default saves (naming it drops Lightning's 'not set' notice); the
                # module's on_save_checkpoint keeps only its learned tensors of the state dict
                trainer.save_checkpoint(final_checkpoints[name], weights_only=False)
            rows[name] = model.accuracies(eval_sets, datamodule.eval_batch_size)
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
