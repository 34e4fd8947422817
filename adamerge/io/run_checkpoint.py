"""Lightning callbacks of adamerge, and the checkpoint I/O they install."""

from __future__ import annotations

import json
import os
import warnings
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import RunInProgressError
from .checkpoints import atomic_write, read_checkpoint

try:
    import fcntl
except ImportError:  # Windows: liveness by pid only
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".adamerge.lock"


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


class RunLock:
    """``FOLDER/.adamerge.lock``: at most one live ``fit`` writes a checkpoint folder.

    The file is created with ``O_CREAT | O_EXCL`` and holds one JSON line (pid, host, start time,
    command line). Its holder keeps an exclusive ``flock`` on it for the whole run; the kernel drops
    that lock when the process ends, however it ends (SIGKILL included), so a lock file left by a
    dead run is *stale* and the next run takes it over, without trusting a pid that may have been
    reused. Where ``flock`` is not available (some network file systems, Windows), a lock is stale
    when its pid is not alive on this host (a lock from another host is never taken over).
    :meth:`release` removes the file, only if it is still this holder's.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # folders the lock created, deepest first

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunInProgressError` naming the folder and the holder."""
        if self._fd is not None:
            return
        if not self.folder.is_dir():
            missing, p = [], self.folder
            while not p.exists():
                missing.append(p)
                p = p.parent
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made = missing
        try:
            for _ in range(20):  # retried only while other runs create and remove the file meanwhile
                try:
                    fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
                except FileExistsError:
                    try:
                        fd, created = os.open(self.path, os.O_RDWR), False
                    except FileNotFoundError:
                        continue
                locked = _flock(fd)
                if locked is False or (locked is None and not created and _alive(_read(fd, wait=False))):
                    holder = _read(fd, wait=True)
                    os.close(fd)
                    raise RunInProgressError(self._in_use(holder))
                if not _same_file(self.path, fd):  # removed (and maybe re-created) by its holder meanwhile
                    os.close(fd)
                    continue
                record = {"pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:8]}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
                self._fd = fd
                return
            raise RunInProgressError(f"{self.folder}: cannot take the run lock {self.path}: other runs "
                                     "keep creating and removing it")
        except BaseException:
            self._remove_folder()
            raise

    def release(self) -> None:
        """Remove the lock file if this holder still owns it; remove the folder if the lock made it
        and nothing else was written there."""
        if self._fd is None:
            return
        try:
            if _same_file(self.path, self._fd):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_folder()

    def _remove_folder(self) -> None:
        for folder in self._made:  # deepest first, each only when empty: saved checkpoints stay
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._made = []

    def _in_use(self, holder: dict) -> str:
        who = f"pid {holder.get('pid', 'unknown')}"
        if holder.get("host") and holder.get("host") != socket.gethostname():
            who += f" on host {holder['host']}"
        if holder.get("started"):
            who += f", since {holder['started']}"
        return (f"{self.folder} is in use by another adamerge fit ({who}): wait for it to end or stop "
                f"it, or give this run another --trainer.default_root_dir (if that run is gone, "
                f"delete {self.path})")


def _flock(fd: int) -> bool | None:
    """Try an exclusive lock without waiting: True (ours now), False (held by a live process),
    None (the file system does not support it)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: no flock here
        return None


def _read(fd: int, wait: bool) -> dict:
    """The holder's record; a holder writes it right after taking the lock, so wait a moment."""
    for _ in range(20 if wait else 1):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            if text:
                record = json.loads(text)
                return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}
        time.sleep(0.025)
    return {}


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _alive(holder: dict) -> bool:
    """Whether the lock's pid runs (without flock: the fallback test of a stale lock)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not a run
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that defaults to ``<default_root_dir>/checkpoints``, saves atomically and
    keeps a second ``fit`` out of a folder whose run is still going.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, which changes
    with every run, so ``--ckpt_path last`` could not find the previous run's ``last.ckpt``.
    A fixed folder per run directory makes resuming a matter of repeating the command.

    At set-up it replaces the strategy's plain ``TorchCheckpointIO`` by
    :class:`AtomicCheckpointIO` (a user-configured checkpoint I/O plugin is left alone), so every
    checkpoint the trainer writes or reads (``--ckpt_path``) goes through it. In ``fit`` it takes
    the folder's :class:`RunLock` (rank zero; every rank fails if it is held by another live run)
    and gives it back at teardown or on an exception.
    """

    _run_lock: RunLock | None = None
    _earlier = 0  # checkpoints in the folder when this fit set up

    def _use_root_dir(self, trainer: "L.Trainer") -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._use_root_dir(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit":  # first: a second fit into a running folder is refused before anything else
            self.lock_run(trainer)
        with warnings.catch_warnings():
            # Lightning warns whenever the folder is not empty, resumes included (and the lock
            # file is there now); adamerge resumes into the run's own folder by design, so only a
            # new run beside an earlier run's checkpoints is worth a warning, given below.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self._earlier = len(list(Path(self.dirpath).glob("*.ckpt"))) if _is_local(self.dirpath) else 0

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # after the checkpoint was restored (a refused resume has already failed): a new run
        # beside an earlier one's checkpoints, the case Lightning's own warning was for
        if trainer.ckpt_path is None and self._earlier and trainer.is_global_zero:
            warnings.warn(f"{self.dirpath} holds {self._earlier} checkpoints of an earlier run; this fit "
                          "starts a new run beside them (to continue that run: --ckpt_path last)",
                          UserWarning, stacklevel=2)
        super().on_fit_start(trainer, pl_module)

    def lock_run(self, trainer: "L.Trainer") -> None:
        """Take the checkpoint folder's :class:`RunLock` (idempotent); every rank raises the same
        one-line error when another live run holds it or the folder cannot be written."""
        self._use_root_dir(trainer)
        if not _is_local(self.dirpath):
            return
        error: BaseException | None = None
        message = None
        if trainer.is_global_zero:
            if self._run_lock is None or self._run_lock.folder != Path(self.dirpath):
                self.release_run()
                self._run_lock = RunLock(self.dirpath)
            try:
                self._run_lock.acquire()
            except (RunInProgressError, OSError) as exc:
                error = exc
                message = str(exc) if isinstance(exc, RunInProgressError) else \
                    f"{self.dirpath}: cannot create the checkpoint folder or its lock: {exc.strerror or exc}"
        message = trainer.strategy.broadcast(message, src=0)
        if message is not None:
            if isinstance(error, OSError):
                raise OSError(message) from error
            raise RunInProgressError(message) from error

    def release_run(self) -> None:
        """Give the run lock back (a no-op when this callback does not hold it)."""
        if self._run_lock is not None:
            self._run_lock.release()

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # Lightning saves last.ckpt at the end only if no last.ckpt was saved during the run, so a
        # run whose max_steps is not a multiple of every_n_train_steps would end with last.ckpt at
        # its last periodic step: `test --ckpt_path last` would then evaluate an earlier model.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = False
        super().on_train_end(trainer, pl_module)

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        try:
            super().teardown(trainer, pl_module, stage)
        finally:
            if stage == "fit":
                self.release_run()

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule",
                     exception: BaseException) -> None:
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self.release_run()

    def _find_last_checkpoints(self, trainer: "L.Trainer") -> set[str]:
        self._use_root_dir(trainer)
        return super()._find_last_checkpoints(trainer)
