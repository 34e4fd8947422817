"""The ``adamerge`` command line.

``fit``, ``validate`` and ``test`` are LightningCLI subcommands driven by YAML configs; the
other commands are small argparse programs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Sequence

from lightning.pytorch.cli import LightningCLI

from .errors import unknown_name

HELP = """usage: adamerge COMMAND [options]

Test-time adaptive model merging (AdaMerging) on Lightning.

commands:
  fit       learn merging coefficients:  adamerge fit --config configs/tiny.yaml
            resume with --ckpt_path last (same --trainer.default_root_dir)
  validate  evaluate merged model(s):     adamerge validate --config FILE [--ckpt_path CKPT]
  test      same, on the evaluation split: adamerge test --config FILE [--ckpt_path CKPT]
  demo      offline miniature benchmark, every method: adamerge demo [--out DIR]
  compare   every method on the pool and data of a fit config:
            adamerge compare --config FILE --out DIR
  export    write the merged model as safetensors:
            adamerge export --config FILE --ckpt_path CKPT --out DIR
  convert   CLIP image-encoder checkpoint (open_clip, Hugging Face, pickled task-vectors
            ImageEncoder with --allow-pickle) -> open_clip image tower safetensors:
            adamerge convert SRC OUT.safetensors
  finetune  make an expert: fine-tune CLIP's image tower on one task (task-vectors recipe):
            adamerge finetune --task mnist --out experts/ViT-B-32/mnist.safetensors
  bench     step time and peak memory vs a plain forward+backward and a naive merge:
            adamerge bench [--model ViT-B-32] [-K 8] [-B 2] [--device cuda]

Run `adamerge COMMAND --help` for the options of a command.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test")


class AdaMergeCLI(LightningCLI):
    """LightningCLI with a checkpoint section that every run gets (periodic + ``last.ckpt``).

    Config files are plain YAML read with a safe loader (no ``!!python`` tags, nothing is
    evaluated); ``class_path`` entries name classes to import and instantiate. File paths in a
    config (``Path_fr`` / ``Path_dr`` arguments) are relative to that config file.
    """

    def add_arguments_to_parser(self, parser) -> None:
        from .callbacks import RunCheckpoint
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50,
                             "checkpoint.save_top_k": -1})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads --ckpt_path itself (for hyperparameters) right after parsing; check
        # the file first so a missing, corrupt or pickled one gets a message naming it.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if isinstance(ckpt, str) and ckpt not in ("last", "best", "hpc") and "://" not in ckpt \
                and not ckpt.startswith("registry"):
            from .checkpoints import read_checkpoint
            read_checkpoint(ckpt)

    def before_instantiate_classes(self) -> None:
        # The config saved next to the run (lightning_logs/version_N/config.yaml) must still
        # point at the same files: write resolved paths into it, not the relative spelling.
        absolute_paths(self.config)


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


def lightning_main(args: Sequence[str]) -> None:
    """Run a LightningCLI subcommand (fit / validate / test)."""
    from .adamerging import AdaMerging
    from .data import MultiTaskDataModule
    AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=list(args),
                save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False},
                trainer_defaults={"max_steps": 500, "check_val_every_n_epoch": None,
                                  "val_check_interval": 500, "log_every_n_steps": 10})


def _compare_parser(prog: str, demo: bool):
    import argparse
    from .compare import ALL_METHODS
    p = argparse.ArgumentParser(prog=prog, description=(
        "Build the offline demo suite (a small ViT 'pretrained' on synthetic 16x16 colour images and 6 "
        "experts: scikit-learn digits, shapes, gratings, dot counts, letters, textures; cached "
        "under $ADAMERGE_CACHE or ~/.cache/adamerge) and compare every merging method on it."
        if demo else
        "Run every merging method on the model pool and data of a fit config (LightningCLI "
        "options such as --config, --model.*, --data.* are accepted) and write the report."))
    p.add_argument("--out", default="runs/demo" if demo else None, required=not demo,
                   help="output folder: results.json, results.md, coefficient heatmaps, TensorBoard runs"
                        + (" (default: runs/demo)" if demo else ""))
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=list(ALL_METHODS),
                   metavar="METHOD", help=f"methods to run (default: all): {' '.join(ALL_METHODS)}")
    p.add_argument("--steps", type=int, default=None,
                   help="AdaMerging steps (default: 500 for the demo, trainer.max_steps of the config)")
    p.add_argument("--val-split", default="val",
                   help="labeled split on which task arithmetic / TIES pick their lambda from a grid "
                        "('none': fixed 0.3 / 1.0) (default: val)")
    p.add_argument("--ta-scaling", type=float, default=None, help="fixed task-arithmetic lambda")
    p.add_argument("--ties-scaling", type=float, default=None, help="fixed TIES lambda")
    if demo:
        p.add_argument("--cache-dir", default=None, help="where the built suite is cached")
        p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                       help="change fields of the demo suite's spec (JSON values; a changed suite "
                            "is built and cached under its own hash), e.g. --set head_shift=0.4 "
                            "colour=false; fields: see adamerge.suite.SuiteSpec")
    return p


def demo_main(args: Sequence[str]) -> None:
    """``adamerge demo``: the offline miniature benchmark."""
    from pathlib import Path
    from .compare import CompareSettings, compare
    from .data import MultiTaskDataModule
    from .suite import SuitePool, SuiteSource, parse_overrides
    ns = _compare_parser("adamerge demo", demo=True).parse_args(list(args))
    overrides = parse_overrides(ns.set)
    pool = SuitePool("demo", cache_dir=ns.cache_dir, overrides=overrides)
    loaded = pool.load()
    dm = MultiTaskDataModule(SuiteSource("demo", overrides=overrides), batch_size=16, eval_batch_size=500)
    settings = CompareSettings(steps=ns.steps or 500, val_split=None if ns.val_split == "none" else ns.val_split,
                               ta_scaling=ns.ta_scaling, ties_scaling=ns.ties_scaling,
                               extra={"suite_key": pool.spec.key(), **({"suite_overrides": overrides} if overrides else {})})
    compare(loaded, dm, Path(ns.out), settings, tuple(ns.methods), suite="demo")


def compare_main(args: Sequence[str]) -> None:
    """``adamerge compare``: every method on the pool and data of a fit config."""
    from pathlib import Path
    from .adamerging import AdaMerging
    from .compare import CompareSettings, compare
    from .data import MultiTaskDataModule
    ns, rest = _compare_parser("adamerge compare", demo=False).parse_known_args(list(args))
    cli = AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=rest, run=False,
                      save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    model, dm = cli.model, cli.datamodule
    settings = CompareSettings(steps=ns.steps or int(cli.trainer.max_steps), lr=model.lr,
                               prior=float(model.hparams.prior),
                               val_split=None if ns.val_split == "none" else ns.val_split,
                               ta_scaling=ns.ta_scaling, ties_scaling=ns.ties_scaling,
                               accelerator="auto")
    compare(model.loaded, dm, Path(ns.out), settings, tuple(ns.methods), suite="custom")


KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, FloatingPointError,
                                                  RuntimeError, argparse.ArgumentError)


def one_line(exc: BaseException) -> str:
    """The message of an error on one line.

    jsonargparse nests its messages (``Parser key "model.pool": / Problem with given class_path
    ... / Parser key "base": / Not of type Path_fr: File does not exist: ...``); they become
    ``model.pool.base: File does not exist: ...``. Other messages keep their first line.
    """
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, argparse.ArgumentError):
        lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
        keys = re.findall(r'Parser key "([^"]+)"', msg)
        if keys and lines and not lines[-1].startswith("Parser key"):
            last = re.sub(r"^Not of type [\w\[\], |]+: ", "", lines[-1])
            return f"{'.'.join(keys)}: {last}"
        return " ".join(lines) or type(exc).__name__
    msg = msg.strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def _lazy(module: str, function: str):
    """A command whose module is imported only when it runs (keeps `adamerge --help` fast)."""
    def run(args: Sequence[str]) -> None:
        import importlib
        getattr(importlib.import_module(f"adamerge.{module}"), function)(args)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {c: lightning_main for c in LIGHTNING_COMMANDS}
    commands.update({"demo": demo_main, "compare": compare_main})
    commands.update(export=_lazy("export", "export_main"), convert=_lazy("convert", "convert_main"),
                    finetune=_lazy("finetune", "finetune_main"), bench=_lazy("benchmark", "bench_main"))
    if command not in commands:
        print(f"adamerge: {unknown_name('command', command, commands)}\n\n{HELP}", file=sys.stderr)
        return 2
    try:
        commands[command]([command, *rest] if command in LIGHTNING_COMMANDS else rest)
    except KNOWN_ERRORS as exc:
        if os.environ.get("ADAMERGE_DEBUG"):
            raise
        print(f"adamerge {command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
