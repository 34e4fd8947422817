"""Per-task datasets -> one unlabeled batch per task per step, plus per-task evaluation loaders.

The adaptation stream is a deterministic function of ``(seed, step)``: the batch at step ``s``
is the same whether a run was interrupted or not, so resuming from a checkpoint continues the
exact data order without saving iterator state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info


class DatasetSource:
    """Where the tasks' datasets come from. Subclasses implement :meth:`task_names` and :meth:`dataset`.

    ``dataset(task, split)`` returns anything indexable with ``len`` that yields an image tensor
    or a tuple ``(image, label, ...)``.
    """

    def task_names(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must implement task_names()")

    def dataset(self, task: str, split: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must implement dataset()")


class InMemorySource(DatasetSource):
    """Datasets given directly: ``{task: {split: dataset}}`` (for Python use and tests)."""

    def __init__(self, datasets: Mapping[str, Mapping[str, Dataset]]) -> None:
        self.datasets = {t: dict(s) for t, s in datasets.items()}

    def task_names(self) -> list[str]:
        return list(self.datasets)

    def dataset(self, task: str, split: str) -> Dataset:
        try:
            return self.datasets[task][split]
        except KeyError:
            raise KeyError(f"task {task!r} has no split {split!r}; it has "
                           f"{list(self.datasets.get(task, {}))}") from None


class FolderSource(DatasetSource):
    """Image folders laid out as ``root/<task>/<split>/<class>/<image>`` (torchvision ImageFolder).

    Args:
        root: the folder holding one sub-folder per task.
        tasks: the tasks to use, in order (default: every sub-folder, sorted).
        image_size: images are resized to this square size and converted to RGB tensors.
    """

    def __init__(self, root: str, tasks: list[str] | None = None, image_size: int = 224) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder does not exist")
        self.tasks = tasks or sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.image_size = image_size

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def dataset(self, task: str, split: str) -> Dataset:
        from torchvision import datasets, transforms
        folder = self.root / task / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no folder for task {task!r}, split {split!r}")
        tf = transforms.Compose([transforms.Resize((self.image_size, self.image_size)),
                                 transforms.Lambda(lambda im: im.convert("RGB")),
                                 transforms.ToTensor()])
        return datasets.ImageFolder(str(folder), transform=tf)


def _image(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict):
        return item["image"]
    return item[0]


class AdaptationStream(IterableDataset):
    """An endless stream of ``{task: images[B]}`` batches, one per step, starting at ``start_step``.

    Each task walks through its own seeded permutations (a new one per pass), so smaller tasks
    cycle. With ``world_size > 1`` each rank yields its own contiguous share of every batch.
    """

    def __init__(self, datasets: Mapping[str, Dataset], batch_size: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.datasets = dict(datasets)
        for task, ds in self.datasets.items():
            if len(ds) == 0:
                raise ValueError(f"task {task!r}: the adaptation dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} devices")
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size

    def indices(self, task_pos: int, n: int, step: int) -> list[int]:
        """Dataset indices of one task's full (all ranks) batch at ``step``."""
        out, perms = [], {}
        first = step * self.batch_size
        for i in range(first, first + self.batch_size):
            epoch, j = divmod(i, n)
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + task_pos * 7919 + epoch)
                perms[epoch] = torch.randperm(n, generator=g)
            out.append(int(perms[epoch][j]))
        return out

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        share = self.batch_size // self.world_size
        lo = self.rank * share
        out = {}
        for pos, (task, ds) in enumerate(self.datasets.items()):
            idx = self.indices(pos, len(ds), step)[lo:lo + share]
            out[task] = torch.stack([_image(ds[i]) for i in idx])
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + wid  # workers take steps round-robin; the loader keeps the order
        while True:
            yield self.batch(step)
            step += nw


class MultiTaskDataModule(L.LightningDataModule):
    """Adaptation batches (one per task per step) and per-task evaluation loaders.

    Args:
        source: where the datasets come from.
        batch_size: unlabeled images per task per step (the paper uses 16).
        eval_batch_size: batch size of the evaluation loaders.
        adapt_split: split used for test-time adaptation (the paper adapts on ``test``).
        eval_split: split used by validate/test.
        num_workers: data-loading worker processes.
        seed: seed of the adaptation order.
        max_eval_samples: evaluate on at most this many samples per task (None: all).
    """

    def __init__(self, source: DatasetSource, batch_size: int = 16, eval_batch_size: int = 128,
                 adapt_split: str = "test", eval_split: str = "test", num_workers: int = 0,
                 seed: int = 0, max_eval_samples: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.adapt_split, self.eval_split = adapt_split, eval_split
        self.num_workers, self.seed, self.max_eval_samples = num_workers, seed, max_eval_samples
        self._cache: dict[tuple[str, str], Dataset] = {}

    def task_names(self) -> list[str]:
        return self.source.task_names()

    def dataset(self, task: str, split: str) -> Dataset:
        key = (task, split)
        if key not in self._cache:
            self._cache[key] = self.source.dataset(task, split)
        return self._cache[key]

    def _start_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = AdaptationStream({t: self.dataset(t, self.adapt_split) for t in self.task_names()},
                                  self.batch_size, seed=self.seed, start_step=self._start_step(),
                                  rank=rank, world_size=world)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)

    def _eval_loaders(self) -> list[DataLoader]:
        loaders = []
        for t in self.task_names():
            ds = self.dataset(t, self.eval_split)
            if len(ds) == 0:
                raise ValueError(f"task {t!r}: the {self.eval_split!r} split is empty")
            if self.max_eval_samples is not None and len(ds) > self.max_eval_samples:
                ds = torch.utils.data.Subset(ds, range(self.max_eval_samples))
            loaders.append(DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False,
                                      num_workers=self.num_workers))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()
