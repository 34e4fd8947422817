"""Evaluation of merged weights, the results table (JSON, Markdown, terminal), coefficient heatmaps
(PNG and TensorBoard) and the quiet console of adamerge's Lightning runs."""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from .io.checkpoints import atomic_write
from .options import VERBOSE_ENV


@torch.no_grad()
def evaluate(encoder: nn.Module, params: Mapping[str, torch.Tensor] | None,
             heads: Mapping[str, nn.Module], datasets: Mapping[str, Dataset],
             batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 accuracy in percent of ``encoder`` (with ``params`` substituted) per task.

    Args:
        encoder: the base module (its own tensors are used where ``params`` has no entry).
        params: merged tensors by name (``None``: the encoder as it is).
        heads: task -> head over the encoder's output.
        datasets: task -> labeled dataset yielding ``(image, label)``.
    """
    encoder.eval()
    accs = {}
    for task, ds in datasets.items():
        correct = total = 0
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
            x, y = batch[0].to(device), batch[1].to(device)
            feats = functional_call(encoder, dict(params), (x,), strict=False) if params else encoder(x)
            correct += int((heads[task](feats).argmax(-1) == y).sum())
            total += len(y)
        if total == 0:
            raise ValueError(f"task {task!r}: the evaluation dataset is empty")
        accs[task] = 100.0 * correct / total
    return accs


def summarize(per_task: Mapping[str, float], individual: Mapping[str, float] | None,
              unseen: Sequence[str] = ()) -> dict[str, Any]:
    """``{"per_task", "avg", "normalized_avg"}`` (+ ``avg_unseen`` when there are unseen tasks).

    ``avg`` and ``normalized_avg`` (mean of acc / individual acc, in %) are over the merged tasks;
    ``avg_unseen`` averages the unseen ones (``None`` for a row that has none, e.g. individual).
    """
    seen = {t: a for t, a in per_task.items() if t not in unseen}
    avg = sum(seen.values()) / len(seen)
    norm = None
    if individual:
        norm = 100.0 * sum(seen[t] / individual[t] if individual[t] else 0.0
                           for t in seen) / len(seen)
    out = {"per_task": dict(per_task), "avg": avg, "normalized_avg": norm}
    if unseen:
        vals = [per_task[t] for t in unseen if t in per_task]
        out["avg_unseen"] = sum(vals) / len(vals) if vals else None
    return out


def build_results(*, suite: str, tasks: Sequence[str], unseen: Sequence[str],
                  methods: Mapping[str, Mapping[str, Any]], descriptions: Mapping[str, str],
                  hparams: Mapping[str, Any], tuned: Mapping[str, Any], settings: Mapping[str, Any],
                  seconds: Mapping[str, float], commit: str | None,
                  profiles: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """The results dict of ``results.json`` (one schema for ``demo``, ``compare``, ``test`` and
    ``validate``): ``methods`` maps each row to its :func:`summarize` output; ``unseen_tasks`` is
    present only when there are unseen tasks; ``profiles`` (row -> models kept, extra storage,
    data used; :meth:`adamerge.methods.registry.Method.profile`) when given."""
    return {"suite": suite, "tasks": list(tasks), **({"unseen_tasks": list(unseen)} if unseen else {}),
            "methods": dict(methods), **({"profiles": dict(profiles)} if profiles else {}),
            "descriptions": dict(descriptions), "hparams": dict(hparams),
            "tuned": dict(tuned), "settings": dict(settings),
            "seconds": {m: round(v, 2) for m, v in seconds.items()}, "commit": commit}


def _columns(results: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(task keys, their column titles): merged tasks, then unseen ones marked ``*``."""
    unseen = list(results.get("unseen_tasks", []))
    return list(results["tasks"]) + unseen, list(results["tasks"]) + [f"{t}*" for t in unseen]


def _cell(row: Mapping[str, Any], task: str, fmt: str) -> str:
    """One task's accuracy, or ``-`` where the row has none (e.g. individual on an unseen task)."""
    value = row["per_task"].get(task)
    return "-" if value is None else format(value, fmt)


def markdown_table(results: Mapping[str, Any]) -> str:
    """The methods x tasks table of a results dict, in Markdown (unseen tasks marked ``*``, with
    their own average column, and a footnote)."""
    keys, titles = _columns(results)
    unseen = bool(results.get("unseen_tasks"))
    profiles = results.get("profiles") or {}
    extra = (" unseen avg |" if unseen else "") + (" models | extra storage | data used |" if profiles else "")
    lines = ["| method | " + " | ".join(titles) + " | avg | normalized |" + extra,
             "|---" * (len(keys) + 3 + unseen + 3 * bool(profiles)) + "|"]
    for name, row in results["methods"].items():
        norm = "" if row.get("normalized_avg") is None else f"{row['normalized_avg']:.1f}"
        line = (f"| {name} | " + " | ".join(_cell(row, t, ".1f") for t in keys)
                + f" | **{row['avg']:.1f}** | {norm} |")
        if unseen:
            u = row.get("avg_unseen")
            line += f" {'-' if u is None else f'{u:.1f}'} |"
        if profiles:
            pr = profiles.get(name, {})
            line += f" {pr.get('models', '')} | {pr.get('storage', '')} | {pr.get('data', '')} |"
        lines.append(line)
    if unseen:
        lines.append(f"\n`*` unseen task: evaluated with its head on the merged model, but no expert of "
                     f"it is merged and none of its images is adapted on; `avg` and `normalized` are "
                     f"over the merged tasks ({len(results['tasks'])}).")
    return "\n".join(lines)


def method_notes(results: Mapping[str, Any]) -> str:
    """One Markdown line per row: the method's registry description and the hyper-parameters it ran
    with (tuned ones marked), from the ``descriptions`` / ``hparams`` / ``tuned`` of a results dict."""
    lines = []
    for name in results["methods"]:
        desc = results.get("descriptions", {}).get(name)
        hp = results.get("hparams", {}).get(name, {})
        tuned = results.get("tuned", {}).get(name, {})
        values = ", ".join(f"{k}={v}" + (" (tuned)" if k in tuned else "") for k, v in hp.items())
        if desc or values:
            lines.append(f"- `{name}`: {desc or ''}" + (f" ({values})" if values else ""))
    return "\n".join(lines)


def terminal_table(results: Mapping[str, Any]) -> str:
    """A plain fixed-width table for the terminal (unseen tasks marked ``*``)."""
    keys, titles = _columns(results)
    unseen = bool(results.get("unseen_tasks"))
    width = max(len(m) for m in results["methods"]) + 2
    profiles = results.get("profiles") or {}
    cols = [t[:9] for t in titles] + ["avg", "norm"] + (["unseen"] if unseen else []) + (["models"] if profiles else [])
    head = " " * width + "".join(f"{c:>10}" for c in cols)
    rows = [head, "-" * len(head)]
    for name, row in results["methods"].items():
        cells = [_cell(row, t, ".1f") for t in keys] + [f"{row['avg']:.1f}"]
        norm = row.get("normalized_avg")
        cells.append("" if norm is None else f"{norm:.1f}")
        if unseen:
            u = row.get("avg_unseen")
            cells.append("-" if u is None else f"{u:.1f}")
        if profiles:
            cells.append(profiles.get(name, {}).get("models", "")[:9])
        rows.append(f"{name:<{width}}" + "".join(f"{c:>10}" for c in cells))
    if unseen:
        rows.append("* unseen task (no expert merged; adapted on only with adapt_tasks); avg/norm over merged tasks")
    return "\n".join(rows)


def write_results(results: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_write(out / "results.md") as tmp:
        notes = method_notes(results)
        tmp.write_text(markdown_table(results) + "\n" + (f"\n{notes}\n" if notes else ""))
    return out / "results.json", out / "results.md"


def coefficient_figure(coefficients: torch.Tensor, param_names: Sequence[str], task_names: Sequence[str],
                       title: str = "learned coefficients"):
    """A matplotlib heatmap of ``[P, K]`` coefficients (parameters x tasks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lam = coefficients.detach().float().cpu().numpy()
    p, k = lam.shape
    fig, ax = plt.subplots(figsize=(2 + 0.9 * k, 1.5 + 0.16 * p))
    # colours span the learned range (a fixed 0-1 scale hid a short run's changes around the prior)
    low, high = float(lam.min()), float(lam.max())
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    im = ax.imshow(lam, aspect="auto", cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(k), list(task_names), rotation=45, ha="right")
    if p > 1:
        ax.set_yticks(range(p), list(param_names), fontsize=7)
    else:
        ax.set_yticks([0], ["all parameters"])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def save_heatmap(coefficients: torch.Tensor, param_names: Sequence[str], task_names: Sequence[str],
                 path: Path, title: str = "learned coefficients") -> Path:
    """Write the coefficient heatmap as a PNG (atomically)."""
    import matplotlib.pyplot as plt
    fig = coefficient_figure(coefficients, param_names, task_names, title)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


class CoefficientHeatmap(L.Callback):
    """The learned coefficients in TensorBoard during ``fit``, and their heatmap as a PNG.

    At each validation of a fit (not the sanity check) and at the end of training, every
    TensorBoard logger gets the heatmap as the image ``coefficients`` and one histogram per task
    column, ``coefficients/<task>`` (a task's coefficients over the parameter tensors). At the end
    of training the heatmap is also written as a PNG, and the run's hyper-parameters are logged
    again with the last ``val/acc_avg`` as ``hp_metric`` (TensorBoard's HPARAMS tab), when the run
    validated. Methods without coefficients (no ``merged.lambdas()``) are skipped, other loggers
    (or none) get only the PNG; rank zero only.

    Args:
        path: PNG to write (default: ``<log dir>/coefficients.png``, the folder of the run's
            TensorBoard events and ``config.yaml``; without a logger ``<default_root_dir>``).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._logged_step: int | None = None  # the step last logged to TensorBoard

    @staticmethod
    def coefficients(pl_module: L.LightningModule) -> tuple[torch.Tensor, list[str], list[str]] | None:
        """``(coefficients [P, K], row names, task names)`` of the module, ``None`` if it has none."""
        merged = getattr(pl_module, "merged", None)
        lambdas = getattr(merged, "lambdas", None)
        if not callable(lambdas):
            return None
        with torch.no_grad():
            lam = lambdas()
        if not isinstance(lam, torch.Tensor) or lam.dim() != 2 or lam.numel() == 0:
            return None
        lam = lam.detach().float().cpu()
        tasks = list(getattr(merged, "task_names", None) or [f"task{k}" for k in range(lam.shape[1])])
        row_names = getattr(merged, "row_names", None)  # split q/k/v rows have names of their own
        names = list(row_names() if callable(row_names) else
                     getattr(getattr(merged, "task_vectors", None), "names", None) or [])
        if lam.shape[0] == 1 or len(names) != lam.shape[0]:
            names = ["all"] if lam.shape[0] == 1 else [str(i) for i in range(lam.shape[0])]
        return lam, names, tasks

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list[Any]:
        """The TensorBoard loggers of the trainer."""
        from lightning.pytorch.loggers import TensorBoardLogger
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _log(self, trainer: L.Trainer, found: tuple[torch.Tensor, list[str], list[str]]) -> None:
        step = trainer.global_step
        if step == self._logged_step:  # the end of training right after its last validation
            return
        self._logged_step = step
        lam, names, tasks = found
        for logger in self._tensorboards(trainer):
            writer = logger.experiment
            fig = coefficient_figure(lam, names, tasks, f"coefficients at step {step}")
            writer.add_figure("coefficients", fig, global_step=step)  # closes the figure
            for k, task in enumerate(tasks):
                writer.add_histogram(f"coefficients/{task}", lam[:, k], global_step=step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.state.fn == "fit" and not trainer.sanity_checking:
            found = self.coefficients(pl_module)
            if found is not None:
                self._log(trainer, found)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask, or DDP runs deadlock
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        found = self.coefficients(pl_module)
        if found is not None:
            self._log(trainer, found)
            lam, names, tasks = found
            save_heatmap(lam, names, tasks, Path(self.path) if self.path else folder / "coefficients.png",
                         f"coefficients at step {trainer.global_step}")
        acc = trainer.callback_metrics.get("val/acc_avg")
        if acc is not None:  # the HPARAMS tab: the run's hyper-parameters and its final accuracy
            for logger in self._tensorboards(trainer):
                params = dict(logger.hparams or pl_module.hparams)
                logger.log_hyperparams(params, metrics={"hp_metric": float(acc)}, step=trainer.global_step)


# ------------------------------------------------------------------ console of Lightning runs

# Warnings that adamerge's runs trigger by design: (message regex, category). Each is hidden
# unless ADAMERGE_VERBOSE=1 (``adamerge ... --verbose``).
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # The merged model's frozen base stays in eval mode on purpose (MergedModel.train: no dropout,
    # no batch-norm statistics updates while the coefficients learn); Lightning warns about any
    # module in eval mode at the start of training.
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    # Lightning 2.6's own _pytree helper builds torch's LeafSpec, deprecated since torch 2.10;
    # nothing adamerge calls, and harmless until Lightning changes it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _LightningTips(logging.Filter):
    """Drops Lightning's advertising tips (litlogger / litmodels), logged at every Trainer start,
    and its "stopped: max_steps reached" line, which ``adamerge fit``'s summary line replaces."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("`Trainer.fit` stopped: `max_steps="):  # adamerge's summary line follows
            return False
        return not ("Tip:" in msg and ("litlogger" in msg or "litmodels" in msg))


def verbose_requested() -> bool:
    """Whether ``$ADAMERGE_VERBOSE`` asks for Lightning's full console output (set by ``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@contextmanager
def quiet_lightning(verbose: bool | None = None) -> Iterator[None]:
    """Hide, inside the block, the Lightning messages that an adamerge run triggers on purpose
    (:data:`QUIET_WARNINGS`, Lightning's litlogger/litmodels tips); everything else (progress bars,
    other warnings, errors) is unchanged. ``verbose`` (default: :func:`verbose_requested`) hides
    nothing. The warning filters are scoped (``warnings.catch_warnings``)."""
    if verbose is None:
        verbose = verbose_requested()
    if verbose:
        with warnings.catch_warnings():  # filters added inside the block stay scoped
            yield
        return
    # rank_zero_info logs to lightning.pytorch's rank_zero logger (fabric's before it is imported)
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                              "lightning.fabric.utilities.rank_zero")]
    tips = _LightningTips()
    with warnings.catch_warnings():  # also scopes filters added inside the block
        for pattern, category in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for log in loggers:
            log.addFilter(tips)
        try:
            yield
        finally:
            for log in loggers:
                log.removeFilter(tips)


def quiet(verbose: bool | None = None) -> Any:
    """``with adamerge.quiet(): trainer.fit(model, data)``: the Python API as quiet as the CLI
    (:func:`quiet_lightning`: Lightning's tips, its stop line and the warnings adamerge's modules
    trigger by design are hidden inside the block; ``ADAMERGE_VERBOSE=1`` shows them)."""
    return quiet_lightning(verbose)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counted in optimizer steps: ``fit 40/60 [...] train/entropy=2.59``.

    An adaptation stream is one endless epoch, which Lightning's bars show as ``Epoch 0/-2`` with
    no total; here the bar reads ``fit``, its total is ``max_steps``, a resumed run starts at the
    checkpoint's step, and the logger's ``v_num`` is left out."""

    @property
    def train_description(self) -> str:
        return "fit"

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        self._in_steps(bar)
        return bar

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning's own would label the bar "Epoch N" (and print it once so)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset()
        self._in_steps(self.train_progress_bar)

    def _in_steps(self, bar: Any) -> None:
        bar.set_description("fit", refresh=False)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            bar.total = self.trainer.max_steps
        bar.n = bar.initial = self.trainer.global_step  # a resumed run starts where it stopped
        if not bar.disable:
            bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        n, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            if not bar.disable:
                bar.n = n
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
