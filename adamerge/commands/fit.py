"""``adamerge fit | validate | test``: LightningCLI subcommands driven by YAML configs.

The model is :class:`adamerge.methods.AdaMerging` or a subclass named by ``model.class_path``
(``adamerge.methods.Surgery``, ``adamerge.methods.Tinting``; a config without ``class_path`` is
AdaMerging), the data :class:`adamerge.data.MultiTaskDataModule`; their typed ``__init__``
signatures are the config schema (``model.*``, ``data.*``).

What every run adds to LightningCLI: ``fit`` logs the coefficients to TensorBoard and writes
their heatmap (:class:`adamerge.report.CoefficientHeatmap`); ``validate`` and ``test`` print the
per-task table of ``adamerge demo`` instead of Lightning's metric box and write ``results.json`` /
``results.md`` into the run's log dir; Lightning's messages that these runs trigger on purpose are
hidden unless ``--verbose`` / ``ADAMERGE_VERBOSE=1`` (:func:`adamerge.report.quiet_lightning`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ..report import (CoefficientHeatmap, StepProgressBar, build_results, quiet_lightning, summarize,
                      terminal_table, verbose_requested, write_results)


def _model_class(model: Any) -> type | None:
    """The class a parsed ``model`` config names (``class_path``), ``None`` when it names none."""
    path = model.get("class_path") if hasattr(model, "get") else None
    if not isinstance(path, str) or "." not in path:
        return None
    import importlib
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


class AdaMergeCLI(LightningCLI):
    """LightningCLI with a checkpoint section that every run gets (periodic + ``last.ckpt``), the
    coefficients in TensorBoard in every ``fit``, and the per-task table and ``results.json``
    after ``validate`` / ``test``.

    Config files are plain YAML read with a safe loader (no ``!!python`` tags, nothing is
    evaluated); ``class_path`` entries name classes to import and instantiate. File paths in a
    config (``Path_fr`` / ``Path_dr`` arguments) are relative to that config file.

    Args:
        verbose: show Lightning's metric box and the messages adamerge hides (default:
            ``$ADAMERGE_VERBOSE``, which ``adamerge ... --verbose`` sets).
    """

    def __init__(self, *args: Any, verbose: bool | None = None, **kwargs: Any) -> None:
        self.verbose = verbose_requested() if verbose is None else verbose
        self._ckpt_step: int | None = None
        self._ckpt_record: dict[str, Any] | None = None  # the --ckpt_path file, read once
        self._eval_started = 0.0
        with quiet_lightning(self.verbose):  # LightningCLI parses, builds and runs in __init__
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        from ..io.run_checkpoint import RunCheckpoint
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_argument("--start_over", type=bool, default=False,
                            help="fit: delete the checkpoints of an earlier run in the run's folder and start "
                                 "a new run there (without it, such a fit is refused: continue that run "
                                 "with --ckpt_path last, or give another --trainer.default_root_dir)")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50,
                             "checkpoint.save_top_k": -1})

    def parse_arguments(self, parser, args) -> None:
        # LightningCLI.parse_arguments warns whenever ``args`` is given while sys.argv has
        # arguments (against mixing the two); adamerge passes the whole command line as ``args``,
        # so parse them as it would, without the warning.
        import argparse

        from jsonargparse import Namespace
        try:
            self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) \
                else parser.parse_args(args)
        except argparse.ArgumentError as exc:
            message = unknown_key_message(str(exc), parser, [] if isinstance(args, (dict, Namespace)) else args)
            if message is None:
                raise
            raise ValueError(message) from None
        # LightningCLI reads --ckpt_path itself (for hyperparameters) right after parsing; check
        # the file first so a missing, corrupt or pickled one gets a message naming it.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if sub == "fit":
            self._check_run_folder(ckpt)
        elif sub in ("validate", "test") and isinstance(ckpt, str) and os.path.isfile(ckpt) \
                and Path(ckpt).resolve().parent.name == "checkpoints":
            trainer = self.config[sub].get("trainer")
            if trainer is not None and trainer.get("default_root_dir") is None:
                # results and logs go to the run the checkpoint belongs to, not the working directory
                trainer["default_root_dir"] = str(Path(ckpt).resolve().parent.parent)
        if isinstance(ckpt, str) and ckpt not in ("last", "best", "hpc") and "://" not in ckpt \
                and not ckpt.startswith("registry"):
            from ..io.checkpoints import CheckpointError, not_a_run_checkpoint, read_checkpoint
            found = read_checkpoint(ckpt)
            what = not_a_run_checkpoint(found)
            if what:  # named here, before Lightning reads keys it does not have
                raise CheckpointError(f"{ckpt}: {what}")
            self._ckpt_record = found
            step = found.get("global_step")
            self._ckpt_step = step if isinstance(step, int) else None
        if sub == "fit":
            trainer = self.config[sub].get("trainer") or {}
            steps, limit = trainer.get("max_steps"), trainer.get("max_time")
            if (not isinstance(steps, int) or steps < 1) and limit is None:
                raise ValueError(f"trainer.max_steps must be a positive number of steps, got {steps}: the "
                                 "adaptation stream never ends (or give trainer.max_time)")
        trainer = (self.config[sub].get("trainer") or {}) if sub else {}
        every = trainer.get("val_check_interval")
        if isinstance(every, (int, float)) and not isinstance(every, bool) and every <= 0:
            raise ValueError(f"trainer.val_check_interval must be a positive number of steps, got {every}")

    def _checkpoint_folder(self) -> str:
        """Where this run's checkpoints go: ``checkpoint.dirpath`` or ``<default_root_dir>/checkpoints``."""
        cfg = self.config[self.config.get("subcommand")]
        return str((cfg.get("checkpoint") or {}).get("dirpath") or os.path.join(
            str((cfg.get("trainer") or {}).get("default_root_dir") or os.getcwd()), "checkpoints"))

    def _check_run_folder(self, ckpt: Any) -> None:
        """A ``fit`` never mixes two runs in one folder: a new run into a folder that holds an
        earlier run's checkpoints is refused (or, with ``--start_over``, those are deleted first),
        and ``--ckpt_path last`` with nothing to continue is refused."""
        folder = self._checkpoint_folder()
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            # another fit still running there: refused now, before Lightning creates the loggers'
            # folders (the lock itself is taken in RunCheckpoint.setup, which guards any race)
            from ..io.run_checkpoint import RunLock
            probe = RunLock(folder)
            probe.acquire()
            probe.release()
        earlier = sorted(p for p in Path(folder).glob("*.ckpt")) if os.path.isdir(folder) else []
        if ckpt == "last" and not (Path(folder) / "last.ckpt").is_file():
            raise ValueError(f"--ckpt_path last: no last.ckpt in {folder}, nothing to continue (check "
                             "--trainer.default_root_dir; without --ckpt_path a new run starts there)")
        if ckpt is not None or not earlier:
            return
        if not self.config["fit"].get("start_over"):
            step = read_step(Path(folder) / "last.ckpt")
            run = f"a run at step {step}" if step is not None else f"{len(earlier)} checkpoints of a run"
            raise ValueError(f"{folder} holds {run}: continue it with --ckpt_path last, start over with "
                             "--start_over true (deletes its checkpoints), or give another --trainer.default_root_dir")
        for path in earlier:
            path.unlink()

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the config's model settings by the checkpoint's, silently; here a
        setting that contradicts the checkpoint's is refused in one line naming both values (the
        run would otherwise not be the one the command asks for), and an agreeing one is kept."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        path = ckpt
        if ckpt == "last":  # adamerge's run folder: <default_root_dir>/checkpoints/last.ckpt
            path = os.path.join(self._checkpoint_folder(), "last.ckpt")
        if not isinstance(path, str) or not os.path.isfile(path):
            return
        from ..io.checkpoints import read_checkpoint
        record = self._ckpt_record if path == ckpt and self._ckpt_record is not None else read_checkpoint(path)
        self._ckpt_record = record
        theirs = dict(record.get("hyper_parameters") or {})
        model = self.config[sub].get("model")
        ours = model.get("init_args", model) if model is not None else None
        ours = ours.as_dict() if hasattr(ours, "as_dict") else dict(ours or {})
        clashes = [f"model.{k}: the checkpoint's {theirs[k]!r}, this command's {ours[k]!r}"
                   for k in theirs if not k.startswith("_") and k != "pool" and k in ours
                   and not _same_setting(theirs[k], ours[k])]
        if clashes:
            raise ValueError(f"{path} was made with other settings ({'; '.join(clashes[:3])}): drop "
                             "them to continue that run, or start a new run in another --trainer.default_root_dir")

    def before_instantiate_classes(self) -> None:
        # The config saved next to the run (lightning_logs/version_N/config.yaml) must still
        # point at the same files: write resolved paths into it, not the relative spelling.
        absolute_paths(self.config)
        if self.config.get("subcommand") == "fit":  # a training-free row: refused before its build (SVDs)
            cls = _model_class(self.config["fit"].get("model"))
            if cls is not None and not getattr(cls, "learns", True):
                from ..methods.adamerging import training_free
                raise ValueError(training_free(cls.__name__, "fit"))

    def before_fit(self) -> None:
        """A module that cannot be fit says so in one line (a training-free class is refused before
        it is built, in :meth:`before_instantiate_classes`)."""
        reason = self.model.refusal("fit") if hasattr(self.model, "refusal") else None
        if reason:
            raise ValueError(reason)

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, with a :class:`CoefficientHeatmap` in ``fit`` unless the config has one, a
        step-counting progress bar, and a resumed fit's logger on the run's TensorBoard version."""
        if self.subcommand == "fit" and "logger" not in kwargs:
            logger = self._logger_of_resumed_run()
            if logger is not None:
                kwargs["logger"] = logger
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit" and not any(isinstance(c, CoefficientHeatmap) for c in trainer.callbacks):
            from lightning.pytorch.callbacks import Checkpoint
            # before the checkpoint callbacks, which Lightning keeps last
            at = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)),
                      len(trainer.callbacks))
            trainer.callbacks.insert(at, CoefficientHeatmap())
        if self.subcommand == "fit":
            from ..methods.registry import RecordRow
            trainer.callbacks.insert(0, RecordRow())
            trainer.callbacks.insert(0, RecordLogVersion())
        self._count_steps(trainer)
        return trainer

    def _count_steps(self, trainer) -> None:
        """Lightning's default progress bar, when the config names none, becomes a
        :class:`StepProgressBar` (steps of ``max_steps``, not ``Epoch 0/-2``)."""
        from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
        bar = trainer.progress_bar_callback
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: no subcommand
        given = (init.get("trainer") or {}).get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if type(bar) not in (RichProgressBar, TQDMProgressBar) or any(isinstance(c, ProgressBar) for c in given):
            return
        trainer.callbacks[trainer.callbacks.index(bar)] = StepProgressBar()

    def _logger_of_resumed_run(self) -> Any:
        """A resumed ``fit`` logs into the TensorBoard version of the run it continues (recorded in
        the checkpoint by :class:`RecordLogVersion`), so its curves do not split into a new
        version; ``None`` when the config names its own logger or nothing is recorded."""
        cfg = self.config_init["fit"].get("trainer") or {}
        record = ((self._ckpt_record or {}).get("adamerge") or {}).get("log")
        if cfg.get("logger") not in (None, True) or not isinstance(record, dict):
            return None
        root = cfg.get("default_root_dir") or os.getcwd()
        if os.path.realpath(str(record.get("save_dir"))) != os.path.realpath(str(root)):
            return None  # the checkpoint was moved or copied: a new version in this folder
        from lightning.pytorch.loggers import TensorBoardLogger
        return TensorBoardLogger(save_dir=str(root), name=str(record.get("name") or "lightning_logs"),
                                 version=record.get("version"))

    # ------------------------------------------------------- validate / test: the results table
    def _before_eval(self) -> None:
        # Lightning's metric box only with --verbose: the per-task table replaces it.
        self.config_init[self.subcommand]["verbose"] = self.verbose
        if not self.verbose:
            # An evaluation saves no checkpoint, so the checkpoint callback's bookkeeping that
            # --ckpt_path restores (best/last paths of the fit run's folder), or its absence when
            # the checkpoint options differ from the fit's, does not matter (other callbacks' do).
            # Scoped by quiet_lightning's catch_warnings around the whole CLI run.
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to "
                                    r".*Please add the following callbacks: \[\"(Run|Model)Checkpoint\{[^\"]*\}\"\]")
        self._eval_started = time.perf_counter()

    before_validate = before_test = _before_eval

    def _after_eval(self) -> None:
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a broadcast: every rank asks
        accs = getattr(self.model, "last_accuracies", None)
        if not accs or not self.trainer.is_global_zero:
            return
        results = eval_results(self, accs, time.perf_counter() - self._eval_started)
        json_path, md_path = write_results(results, out)
        row = next(iter(results["methods"].values()))
        stage = "val" if self.subcommand == "validate" else "test"
        logged = f"{stage}/acc_avg {row['avg']:.2f}" + (
            f", {stage}/acc_avg_unseen {row['avg_unseen']:.2f}" if row.get("avg_unseen") is not None else "")
        print("\n" + terminal_table(results) + f"\n{logged} (top-1 %)")
        print(f"\nwrote {json_path} and {md_path}")

    after_validate = after_test = _after_eval

    def after_fit(self) -> None:
        """One summary line after a fit: the last metric, the checkpoint to resume or test, the
        TensorBoard folder and the coefficient heatmap (rank zero only)."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        shown = [f"{k} {metrics[k]:.2f}" for k in ("val/acc_avg",) if k in metrics]
        loss = next((k for k in metrics if k.startswith("train/") and k.count("/") == 1), None)
        if loss:
            shown.append(f"{loss} {metrics[loss]:.4f}")
        ckpt = next((c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks
                     if getattr(c, "last_model_path", "") or getattr(c, "best_model_path", "")), "")
        parts = [f"adamerge fit: {trainer.global_step} steps", *shown]
        if ckpt:
            parts.append(f"checkpoint {ckpt}")
        log_dir = trainer.log_dir if trainer.loggers else None
        if log_dir:
            parts.append(f"TensorBoard {log_dir}")
            heatmap = Path(log_dir) / "coefficients.png"
            if heatmap.is_file():
                parts.append(f"heatmap {heatmap}")
        print("; ".join(parts), flush=True)


class RecordLogVersion(Callback):
    """Writes the TensorBoard folder of a ``fit`` into every checkpoint
    (``checkpoint["adamerge"]["log"]``: save_dir, name, version), so that a resumed run continues
    the same version (:meth:`AdaMergeCLI._logger_of_resumed_run`)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is not None:
            checkpoint.setdefault("adamerge", {})["log"] = {
                "save_dir": os.path.abspath(logger.save_dir), "name": logger.name, "version": logger.version}


def unknown_key_message(error: str, parser: Any, args: Sequence[str]) -> str | None:
    """jsonargparse's "does not accept option 'model.priorr'" (or "unrecognized arguments:
    --model.priorr") as one line naming the config file and line that hold the key (or the
    command line) and the nearest key the command knows; ``None`` for other errors."""
    import re
    found = re.search(r"does not accept option '([^']+)'", error) or \
        re.search(r"unrecognized arguments: --([\w.]+)", error)
    nested = re.search(r"Option '([^']+)' is not accepted", error)  # a key of a class_path's init_args
    if nested is not None:
        prefix = re.findall(r'Parser key "([^"]+)"', error)
        classes = re.findall(r"class_path '([^']+)'", error)
        names = _init_parameters(classes[-1]) if classes else []
        option = nested.group(1)  # a mapping under an unknown key comes flattened: expert.digits
        if option.split(".")[0] not in names:
            option = option.split(".")[0]
        key = ".".join([*prefix, option])
        known = [".".join([*prefix, name]) for name in names]
    elif found is not None:
        key = found.group(1)
        known = _parser_keys(parser, next((a for a in args if a in ("fit", "validate", "test")), None))
    else:
        return None
    near = _nearest_key(key, known)
    hint = f"; did you mean {near}?" if near else ""
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")] + \
        [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in configs:
        line = yaml_key_line(path, key)
        if line is not None:
            return f"{path}, line {line}: unknown key {key}{hint}"
    return f"unknown key {key} (command line: --{key}){hint}"


def _parser_keys(parser: Any, sub: str | None) -> list[str]:
    """The dotted keys a (sub)command's parser accepts, with ``init_args.`` dropped."""
    try:
        target = parser._subcommands_action._name_parser_map[sub] if sub else parser
        keys = [k for k in target.get_defaults().keys()]
    except (AttributeError, KeyError, TypeError):
        return []
    for action in getattr(target, "_actions", []):  # subclass-mode groups (model.pool, ...) too
        for opt in getattr(action, "option_strings", []):
            if opt.startswith("--") and not opt.endswith(".help"):
                keys.append(opt[2:])
    return sorted({k.replace(".init_args.", ".") for k in keys})


def _init_parameters(class_path: str) -> list[str]:
    """The ``__init__`` parameter names of the class ``class_path`` and of its bases (a subclass
    passing ``**kwargs`` on accepts its base's), ``[]`` if it cannot be imported."""
    import importlib
    import inspect
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return list(dict.fromkeys(names))


def _nearest_key(key: str, known: Sequence[str]) -> str | None:
    """The known key closest to ``key`` (:func:`adamerge.errors.suggest`): among the keys of its
    own section first (``model.*``), then among all."""
    from ..errors import suggest
    section, _, leaf = key.rpartition(".")
    same = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    near = suggest(leaf, same) if same else None
    return same[near] if near else suggest(key, known)


def yaml_key_line(path: str, key: str) -> int | None:
    """The 1-based line of the dotted ``key`` in the YAML file ``path`` (an ``init_args`` level
    between two parts is allowed), or ``None``."""
    import yaml
    try:
        node = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    parts = key.split(".")
    while parts and isinstance(node, yaml.MappingNode):
        entries = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if parts[0] not in entries and "init_args" in entries:
            node = entries["init_args"][1]
            continue
        if parts[0] not in entries:
            return None
        k, node = entries[parts.pop(0)]
        if not parts:
            return k.start_mark.line + 1
    return None


def row_name(model: Any, checkpoint: dict[str, Any] | None = None) -> tuple[str, str]:
    """The registry row of a run (name, description): the one recorded in the loaded
    ``checkpoint`` when it records one (written by every adamerge checkpoint), else the module's
    (:func:`adamerge.methods.registry.row_of`)."""
    from ..methods import registry
    recorded = ((checkpoint or {}).get("adamerge") or {}).get("row")
    if isinstance(recorded, str):
        base = recorded.split(" (")[0]
        return recorded, registry.REGISTRY[base].description if base in registry.REGISTRY else ""
    return registry.row_of(model)


def read_step(path: Path) -> int | None:
    """The global step a checkpoint file records (``None`` if it cannot tell)."""
    try:
        from ..io.checkpoints import read_checkpoint
        step = read_checkpoint(path).get("global_step")
    except (OSError, ValueError):
        return None
    return step if isinstance(step, int) else None


def _same_setting(a: Any, b: Any) -> bool:
    """Whether a checkpoint's hyper-parameter and a config's value are the same setting (numbers
    by value, paths by their string, lists and tuples alike)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    a, b = (str(getattr(v, "absolute", v)) if hasattr(v, "absolute") else v for v in (a, b))
    if isinstance(a, str) and isinstance(b, str) and (os.path.exists(a) or os.path.exists(b)):
        return os.path.realpath(a) == os.path.realpath(b)
    plain = lambda v: json.loads(json.dumps(v, default=str))
    try:
        return plain(a) == plain(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a hyper-parameter value (anything else as its string)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def eval_results(cli: AdaMergeCLI, accs: dict[str, float], seconds: float) -> dict[str, Any]:
    """The ``results.json`` of a ``validate`` / ``test`` run: one row, the schema of ``adamerge demo``."""
    from ..compare import _git_commit
    model, dm, sub = cli.model, cli.datamodule, cli.subcommand
    cfg = cli.config[sub]
    ckpt = cfg.get("ckpt_path")
    name, description = row_name(model, getattr(cli, "_ckpt_record", None))
    unseen = [t for t in getattr(model, "unseen_tasks", []) if t in accs]
    hparams = {k: _plain(v) for k, v in dict(model.hparams).items() if not k.startswith("_")}
    configs = [str(getattr(c, "absolute", c)) for c in (cfg.get("config") or [])]
    settings = {"steps": cli._ckpt_step, "val_split": None, "seed": cfg.get("seed_everything"),
                "batch_size": getattr(dm, "batch_size", None),
                "adapt_split": getattr(dm, "adapt_split", None), "eval_split": getattr(dm, "eval_split", None),
                **({"corruption": dm.corruption, "severity": dm.severity}
                   if getattr(dm, "corruption", None) else {}),
                "command": sub, "ckpt_path": None if ckpt is None else str(ckpt), "config": configs}
    return build_results(suite="custom", tasks=list(model.task_names), unseen=unseen,
                         methods={name: summarize(accs, None, unseen)},
                         descriptions={name: description}, hparams={name: hparams}, tuned={},
                         settings=settings, seconds={name: seconds}, commit=_git_commit())


def absolute_paths(value: Any) -> Any:
    """Replace, in place, every jsonargparse ``Path`` in a parsed config by its absolute form."""
    from jsonargparse import Namespace, Path as ArgPath
    if isinstance(value, ArgPath):
        return type(value)(os.path.normpath(value.absolute))
    if isinstance(value, Namespace):
        for key in list(value.keys()):
            value[key] = absolute_paths(value[key])
    elif isinstance(value, dict):
        for key in list(value):
            value[key] = absolute_paths(value[key])
    elif isinstance(value, list):
        value[:] = [absolute_paths(v) for v in value]
    return value


def names_model_class(args: Sequence[str]) -> bool:
    """Whether the command line or one of its ``--config`` files names ``model.class_path``.

    Only then is the model parsed in subclass mode (AdaMerging or a subclass such as Surgery);
    plain AdaMerging configs keep the plain mode, whose errors name the exact key and value.
    """
    import yaml
    args = list(args)
    for i, arg in enumerate(args):
        if arg.startswith("--model.class_path") or arg == "--model" or arg.startswith("--model="):
            return True
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else \
            args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        if path is None or not os.path.isfile(path):
            continue
        try:
            cfg = yaml.safe_load(open(path).read())
        except OSError:
            continue  # LightningCLI reports unreadable configs itself
        except yaml.YAMLError as exc:  # named here: jsonargparse's message names no file
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "class_path" in cfg["model"]:
            return True
    return False


class DeferredSaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` of a run, written once the run has started, not in
    ``setup``: a run refused in setup (e.g. another ``fit`` still holds the folder, see
    :class:`adamerge.io.run_checkpoint.RunLock`) leaves nothing and overwrites nothing."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage

    def _save_once(self, trainer, pl_module) -> None:
        if not getattr(self, "_saved", False):
            self._saved = True
            super().setup(trainer, pl_module, getattr(self, "_stage", "fit"))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module)


def lightning_main(args: Sequence[str]) -> None:
    """Run a LightningCLI subcommand (fit / validate / test)."""
    from ..data.datamodule import MultiTaskDataModule
    from ..methods.adamerging import AdaMerging
    AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=list(args), save_config_callback=DeferredSaveConfig,
                subclass_mode_model=names_model_class(args),
                save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False},
                trainer_defaults={"max_steps": 500, "check_val_every_n_epoch": None,
                                  "val_check_interval": 500, "log_every_n_steps": 10})
