"""``adamerge fit | validate | test``: LightningCLI subcommands driven by YAML configs.

The model is :class:`adamerge.methods.AdaMerging` or a subclass named by ``model.class_path``
(``adamerge.methods.Surgery``, ``adamerge.methods.Tinting``; a config without ``class_path`` is
AdaMerging), the data :class:`adamerge.data.MultiTaskDataModule`; their typed ``__init__``
signatures are the config schema (``model.*``, ``data.*``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from lightning.pytorch.cli import LightningCLI

class AdaMergeCLI(LightningCLI):
    """LightningCLI with a checkpoint section that every run gets (periodic + ``last.ckpt``).

    Config files are plain YAML read with a safe loader (no ``!!python`` tags, nothing is
    evaluated); ``class_path`` entries name classes to import and instantiate. File paths in a
    config (``Path_fr`` / ``Path_dr`` arguments) are relative to that config file.
    """

    def add_arguments_to_parser(self, parser) -> None:
        from ..io.run_checkpoint import RunCheckpoint
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
            from ..io.checkpoints import read_checkpoint
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
        except (OSError, yaml.YAMLError):
            continue  # LightningCLI reports unreadable configs itself
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "class_path" in cfg["model"]:
            return True
    return False


def lightning_main(args: Sequence[str]) -> None:
    """Run a LightningCLI subcommand (fit / validate / test)."""
    from ..data.datamodule import MultiTaskDataModule
    from ..methods.adamerging import AdaMerging
    AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=list(args),
                subclass_mode_model=names_model_class(args),
                save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False},
                trainer_defaults={"max_steps": 500, "check_val_every_n_epoch": None,
                                  "val_check_interval": 500, "log_every_n_steps": 10})
