"""Lightning callbacks of adamerge."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that defaults to ``<default_root_dir>/checkpoints``.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, which changes
    with every run, so ``--ckpt_path last`` could not find the previous run's ``last.ckpt``.
    A fixed folder per run directory makes resuming a matter of repeating the command.
    """

    def _use_root_dir(self, trainer: "L.Trainer") -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._use_root_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: "L.Trainer") -> set[str]:
        self._use_root_dir(trainer)
        return super()._find_last_checkpoints(trainer)
