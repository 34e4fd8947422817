"""Lightning callbacks of adamerge, and the checkpoint I/O they install."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoints import atomic_write, read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that cannot leave a half-written checkpoint under its final name.

    Lightning's own local save writes through an fsspec transaction: to a temporary file in the
    system temp folder, then ``shutil.move``, which degrades to copy-then-delete when that folder
    is on another file system (a process killed during the copy leaves a truncated ``last.ckpt``)
    and never ``fsync``\\ s. This one writes next to the destination, flushes it to disk and
    renames it into place (:func:`adamerge.io.checkpoints.atomic_write`); the temporary name
    (``.last.ckpt.<random>.tmp``) is never taken for a checkpoint by ``--ckpt_path last``.

    Loading uses ``weights_only=True`` unless the caller explicitly passes ``weights_only=False``
    (``--weights_only false``): adamerge checkpoints hold only tensors and plain data. A missing,
    truncated or foreign file raises :class:`CheckpointError` naming it.

    Remote paths (``s3://`` ...) are left to Lightning.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path) or weights_only is False or map_location is not None:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(path)  # on CPU; Lightning copies the states onto the module's device


def _is_local(path: str | os.PathLike) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that defaults to ``<default_root_dir>/checkpoints`` and saves atomically.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, which changes
    with every run, so ``--ckpt_path last`` could not find the previous run's ``last.ckpt``.
    A fixed folder per run directory makes resuming a matter of repeating the command.

    At set-up it replaces the strategy's plain ``TorchCheckpointIO`` by
    :class:`AtomicCheckpointIO` (a user-configured checkpoint I/O plugin is left alone), so every
    checkpoint the trainer writes or reads (``--ckpt_path``) goes through it.
    """

    def _use_root_dir(self, trainer: "L.Trainer") -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._use_root_dir(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: "L.Trainer") -> set[str]:
        self._use_root_dir(trainer)
        return super()._find_last_checkpoints(trainer)
