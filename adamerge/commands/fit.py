"""``adamerge fit | validate | test``: LightningCLI subcommands driven by YAML configs.

The model is :class:`adamerge.methods.AdaMerging`, the data :class:`adamerge.data.MultiTaskDataModule`;
their typed ``__init__`` signatures are the config schema (``model.*``, ``data.*``).
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


def lightning_main(args: Sequence[str]) -> None:
    """Run a LightningCLI subcommand (fit / validate / test)."""
    from ..data.datamodule import MultiTaskDataModule
    from ..methods.adamerging import AdaMerging
    AdaMergeCLI(AdaMerging, MultiTaskDataModule, args=list(args),
                save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False},
                trainer_defaults={"max_steps": 500, "check_val_every_n_epoch": None,
                                  "val_check_interval": 500, "log_every_n_steps": 10})
