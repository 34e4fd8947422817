"""Per-task datasets -> one unlabeled batch per task per step, plus per-task evaluation loaders.

The adaptation stream is a deterministic function of ``(seed, step)``: the batch at step ``s``
is the same whether a run was interrupted or not, so resuming from a checkpoint continues the
exact data order without saving iterator state.
"""

from __future__ import annotations

import copy
import os
import zlib
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import lightning as L
import torch
from jsonargparse.typing import path_type
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, get_worker_info

from ..errors import suggest, unknown_name


class DatasetSource(ABC):
    """Where the tasks' datasets come from. Subclasses implement :meth:`task_names` and :meth:`dataset`.

    ``dataset(task, split)`` returns anything indexable with ``len`` that yields an image tensor
    or a tuple ``(image, label, ...)``.
    """

    @abstractmethod
    def task_names(self) -> list[str]:
        """The tasks this source has, in order."""

    @abstractmethod
    def dataset(self, task: str, split: str) -> Dataset:
        """One task's split."""


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


# A folder that must exist; relative paths in a config file are relative to that file.
Path_dr = path_type("dr", docstring="path to a directory that exists and is readable")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UndecodableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped (``on_decode_error: skip``)."""


class ImageFolderDataset(Dataset):
    """``folder/<class>/<image>`` as ``(image [3, S, S] float in [0, 1], class index)``.

    Classes are the sorted sub-folders (as in torchvision's ``ImageFolder``), images the files
    with an image extension below each, sorted.

    Args:
        folder: the split folder.
        image_size: images are converted to RGB and resized to this square size.
        on_decode_error: ``fail`` raises an error naming the file; ``skip`` warns (with the
            running count of skipped files) and returns the next decodable image instead, so
            batch sizes stay fixed.
    """

    def __init__(self, folder: str | Path, image_size: int,
                 on_decode_error: Literal["fail", "skip"] = "fail") -> None:
        if on_decode_error not in ("fail", "skip"):
            raise ValueError(f"on_decode_error must be 'fail' or 'skip', got {on_decode_error!r}")
        self.folder, self.image_size, self.on_decode_error = Path(folder), image_size, on_decode_error
        self.classes = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.folder}: no class folders (expected {self.folder}/<class>/<image>)")
        self.samples = [(f, label) for label, c in enumerate(self.classes)
                        for f in sorted((self.folder / c).rglob("*"))
                        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"{self.folder}: no images in its {len(self.classes)} class folders "
                             f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.skipped: dict[str, str] = {}  # file -> reason, in this process

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        with Image.open(path) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        return pil_to_tensor(im).float().div_(255)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for step in range(len(self.samples)):
            path, label = self.samples[(index + step) % len(self.samples)]
            try:
                return self._load(path), label
            except Exception as exc:  # PIL raises many types for broken files
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if self.on_decode_error == "fail":
                    raise ValueError(f"{path}: cannot decode image ({reason}); set "
                                     "on_decode_error: skip to skip such files") from exc
                if str(path) not in self.skipped:
                    self.skipped[str(path)] = reason
                    warnings.warn(f"skipped {len(self.skipped)} undecodable image(s) in {self.folder} so "
                                  f"far; latest {path}: {reason}", UndecodableImageWarning, stacklevel=2)
        raise ValueError(f"{self.folder}: none of its {len(self.samples)} images can be decoded")


class FolderSource(DatasetSource):
    """Image folders laid out as ``root/<task>/<split>/<class>/<image>`` (torchvision ImageFolder).

    Args:
        root: the folder holding one sub-folder per task (relative paths in a config file are
            relative to that file).
        tasks: the tasks to use, in order (default: every sub-folder, sorted).
        image_size: images are resized to this square size and converted to RGB tensors.
        on_decode_error: what to do with an image file that cannot be decoded: ``fail`` (an
            error naming the file) or ``skip`` (a warning with the count of skipped files; the
            next decodable image of the split takes its place).
    """

    def __init__(self, root: Path_dr, tasks: list[str] | None = None, image_size: int = 224,
                 on_decode_error: Literal["fail", "skip"] = "fail") -> None:
        self.root = Path(os.fspath(root)).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder does not exist")
        if on_decode_error not in ("fail", "skip"):
            raise ValueError(f"on_decode_error must be 'fail' or 'skip', got {on_decode_error!r}")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        for task in tasks or []:
            if task not in found:
                raise ValueError(unknown_name("task", task, found, where=f" in {self.root}"))
        self.tasks = list(tasks or found)
        self.image_size, self.on_decode_error = image_size, on_decode_error

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def dataset(self, task: str, split: str) -> Dataset:
        if task not in self.tasks:
            raise ValueError(unknown_name("task", task, self.tasks, where=f" in {self.root}"))
        folder = self.root / task / split
        if not folder.is_dir():
            splits = sorted(p.name for p in (self.root / task).iterdir() if p.is_dir())
            raise FileNotFoundError(f"{folder}: no folder for task {task!r}, split {split!r} "
                                    f"(splits there: {splits})")
        return ImageFolderDataset(folder, self.image_size, self.on_decode_error)


def image_of(item: Any) -> torch.Tensor:
    """The image of a dataset item that is an image, ``(image, label, ...)`` or ``{"image": ...}``."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, dict):
        return item["image"]
    return item[0]


def label_of(item: Any) -> int | None:
    """The label of a dataset item ``(image, label, ...)`` or ``{"label": ...}``; ``None`` for a bare image."""
    if isinstance(item, dict):
        return int(item["label"]) if "label" in item else None
    if isinstance(item, (tuple, list)) and len(item) > 1:
        return int(item[1])
    return None


def labels_of(ds: Dataset) -> torch.Tensor:
    """Every label of a dataset of ``(image, label, ...)`` items, as a long tensor ``[len(ds)]``.

    Read without decoding images where the dataset exposes them (a ``TensorDataset``'s second
    tensor, an image folder's ``samples``, a ``labels`` tensor/array or ``raw.labels()`` as in
    :mod:`adamerge.data.hf`, a ``Subset`` of those); otherwise each item is read once.
    """
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if isinstance(ds, TensorDataset) and len(ds.tensors) > 1:
        return ds.tensors[1].long()
    samples = getattr(ds, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return torch.tensor([s[1] for s in samples], dtype=torch.long)
    for owner in (ds, getattr(ds, "raw", None)):
        labels = getattr(owner, "labels", None)
        if callable(labels):
            labels = labels()
        if labels is not None and not callable(labels) and len(labels) == len(ds):
            return torch.as_tensor(labels, dtype=torch.long)
    out = []
    for i in range(len(ds)):
        item = ds[i]
        if isinstance(item, dict) and "label" in item:
            out.append(int(item["label"]))
        elif isinstance(item, (tuple, list)) and len(item) > 1:
            out.append(int(item[1]))
        else:
            raise ValueError(f"{type(ds).__name__}[{i}] has no label (expected (image, label) items); "
                             "few-shot data needs a labeled split")
    return torch.tensor(out, dtype=torch.long)


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int, name: str = "dataset") -> list[int]:
    """``shots`` indices per class, drawn by a seeded permutation (sorted; the same every run).

    A class with fewer than ``shots`` examples gives all it has; ``name`` is used in errors.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if labels.numel() == 0:
        raise ValueError(f"{name}: no labeled examples to draw {shots} shots per class from")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.numel(), generator=g)
    taken: dict[int, int] = {}
    keep = []
    for i in order.tolist():
        c = int(labels[i])
        if taken.get(c, 0) < shots:
            taken[c] = taken.get(c, 0) + 1
            keep.append(i)
    return sorted(keep)


class LabeledSubset(Subset):
    """A :class:`~torch.utils.data.Subset` that remembers its labels (few-shot data)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], labels: torch.Tensor) -> None:
        super().__init__(dataset, list(indices))
        self.labels = labels


def label_count(ds: Dataset) -> tuple[int, bool] | None:
    """How many classes a dataset's labels span, when that is cheap to know, else None.

    Returns ``(count, exact)``: ``exact`` when the dataset declares its classes (a ``classes``
    list as in image folders, a Hugging Face ``ClassLabel`` feature); otherwise ``count`` is
    ``max label + 1`` of an in-memory label tensor (a lower bound). Nothing is decoded.
    """
    if isinstance(ds, Subset):
        inner = ds.dataset
        if isinstance(inner, TensorDataset) and len(inner.tensors) > 1:
            labels = inner.tensors[1][torch.as_tensor(list(ds.indices), dtype=torch.long)]
            return _max_label(labels)
        return label_count(inner)
    classes = getattr(ds, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes), True
    features = getattr(ds, "features", None)
    if isinstance(features, Mapping):
        for key in ("label", "labels"):
            n = getattr(features.get(key), "num_classes", None)
            if isinstance(n, int):
                return n, True
    if isinstance(ds, TensorDataset) and len(ds.tensors) > 1:
        return _max_label(ds.tensors[1])
    return None


def _max_label(labels: torch.Tensor) -> tuple[int, bool] | None:
    if labels.ndim != 1 or labels.is_floating_point() or labels.numel() == 0:
        return None
    return int(labels.max()) + 1, False


class AdaptationStream(IterableDataset):
    """An endless stream of ``{task: (images[B], indices[B])}`` batches, one per step, from ``start_step``.

    ``indices`` are the images' positions in the task's dataset: methods that cache per-image
    values (expert features) key them by it. With ``labeled=True`` each batch is
    ``(images, indices, labels)`` (few-shot supervised objectives); the labels are read with
    :func:`labels_of` once.

    Each task walks through its own seeded permutations (a new one per pass), so smaller tasks
    cycle. With ``world_size > 1`` each rank yields its own contiguous share of every batch.

    ``task_steps=True``: the batch at step ``s`` holds only the task at position ``s mod T``
    (``T`` tasks, in the order of ``datasets``), and that task's batch is its ``s // T``-th:
    the same images as its part of the all-task batch at step ``s // T`` (see :meth:`task_at`).
    Each task thus walks its own permutations by its own count of steps, every ``T`` steps
    visit each task once, resuming at any step is exact, and :meth:`units` is unchanged.
    """

    def __init__(self, datasets: Mapping[str, Dataset], batch_size: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, labeled: bool = False,
                 task_steps: bool = False) -> None:
        self.datasets = dict(datasets)
        self.labels = {t: labels_of(ds) for t, ds in self.datasets.items()} if labeled else None
        for task, ds in self.datasets.items():
            if len(ds) == 0:
                raise ValueError(f"task {task!r}: the adaptation dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} devices")
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.task_steps = task_steps

    def task_at(self, step: int) -> tuple[int, int]:
        """With ``task_steps``: ``(task position, that task's own step)`` of the batch at ``step``,
        i.e. ``(step mod T, step // T)``."""
        return step % len(self.datasets), step // len(self.datasets)

    def permutation(self, task_pos: int, n: int, epoch: int) -> torch.Tensor:
        """The order in which pass ``epoch`` visits the ``n`` images of the task at ``task_pos``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + task_pos * 7919 + epoch)
        return torch.randperm(n, generator=g)

    def indices(self, task_pos: int, n: int, step: int) -> list[int]:
        """Dataset indices of one task's full (all ranks) batch at ``step``."""
        out, perms = [], {}
        first = step * self.batch_size
        for i in range(first, first + self.batch_size):
            epoch, j = divmod(i, n)
            if epoch not in perms:
                perms[epoch] = self.permutation(task_pos, n, epoch)
            out.append(int(perms[epoch][j]))
        return out

    def units(self) -> Callable[[str, int], list[int]]:
        """``(task, index) -> indices``: the images this rank is given together with ``index`` in
        the first pass (its share of that step's batch; at the end of the pass, the images left
        before the next pass begins).

        A per-image cache that computes a whole unit when one of its images is first needed
        (:class:`adamerge.engine.expert_features.FeatureCache`) computes, in the first pass,
        exactly the batch in hand, and a resumed run (empty cache) recomputes the same units,
        so it sees bitwise the features an uninterrupted run saw."""
        share = self.batch_size // self.world_size
        positions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def unit(task: str, index: int) -> list[int]:
            if task not in positions:
                pos, n = list(self.datasets).index(task), len(self.datasets[task])
                perm = self.permutation(pos, n, 0)
                inverse = torch.empty_like(perm)
                inverse[perm] = torch.arange(n)
                positions[task] = (perm, inverse)
            perm, inverse = positions[task]
            lo = int(inverse[index]) // share * share
            return [int(i) for i in perm[lo:lo + share]]
        return unit

    def batch(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        share = self.batch_size // self.world_size
        lo = self.rank * share
        out = {}
        tasks = list(enumerate(self.datasets.items()))
        if self.task_steps:  # one task per step, in turn, each at its own count of steps
            pos, step = self.task_at(step)
            tasks = [tasks[pos]]
        for pos, (task, ds) in tasks:
            idx = self.indices(pos, len(ds), step)[lo:lo + share]
            index = torch.tensor(idx, dtype=torch.long)
            out[task] = (torch.stack([image_of(ds[i]) for i in idx]), index)
            if self.labels is not None:
                out[task] += (self.labels[task][index],)
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
        shots: few-shot supervised adaptation (objective ``cross_entropy``): adapt on this many
            labeled images per class of each task, drawn from ``shots_split`` with a seed fixed
            by ``seed`` and the task name; batches then carry the labels. ``None``: every image of
            the adaptation split, unlabeled.
        shots_split: the split the shots come from (default: ``adapt_split``). With the paper's
            ``adapt_split: test`` the labeled shots are test images; ``train`` keeps them apart.
        corruption: corrupt the adaptation images (one of
            :data:`adamerge.data.corruptions.CORRUPTIONS`, deterministic per image) at
            ``severity`` 1-5; ``None``: clean images.
        eval_corruption: corruption of the evaluation images; ``same`` (default) uses
            ``corruption``, ``None`` keeps them clean. ``eval_severity`` (default: ``severity``).
        task_steps: one optimizer step per task batch, tasks in turn (SyMerge/Tinting's and
            FusionBench Surgery's schedule): the batch of step ``s`` holds only the task at
            position ``s mod T`` of :meth:`task_names` (``T`` tasks), with the images that task
            has in the all-task batch of step ``s // T`` (:class:`AdaptationStream`).
            ``trainer.max_steps`` then counts single-task steps (``500 x T`` for 500 rounds).
            ``False`` (default): every step holds every task's batch.
    """

    def __init__(self, source: DatasetSource, batch_size: int = 16, eval_batch_size: int = 128,
                 adapt_split: str = "test", eval_split: str = "test", num_workers: int = 0,
                 seed: int = 0, max_eval_samples: int | None = None, shots: int | None = None,
                 shots_split: str | None = None, corruption: str | None = None, severity: int = 3,
                 eval_corruption: str | None = "same", eval_severity: int | None = None,
                 task_steps: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0: load in the main process), got {num_workers}")
        if shots is not None and shots < 1:
            raise ValueError(f"data.shots must be >= 1 (labeled images per class), got {shots}")
        self.shots, self.shots_split = shots, shots_split
        self.task_steps = bool(task_steps)
        from .corruptions import CorruptedDataset
        for name, sev in ((corruption, severity), (None if eval_corruption == "same" else eval_corruption,
                                                   eval_severity or severity)):
            if name is not None:
                CorruptedDataset([], name, sev)  # an unknown name or severity fails here, naming it
        self.corruption, self.severity = corruption, severity
        self.eval_corruption, self.eval_severity = eval_corruption, eval_severity
        self.source = source
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.adapt_split, self.eval_split = adapt_split, eval_split
        self.num_workers, self.seed, self.max_eval_samples = num_workers, seed, max_eval_samples
        self._cache: dict[tuple[str, str], Dataset] = {}
        self._tasks: list[str] | None = None
        self._unseen: list[str] = []
        self._adapted: list[str] | None = None  # the stream's tasks when not the merged ones

    def task_names(self) -> list[str]:
        """The merged tasks: those of the model pool once :meth:`select_tasks` ran, else the source's
        (the tasks adapted on, unless :meth:`select_tasks` named others: :meth:`adaptation_task_names`)."""
        return list(self._tasks) if self._tasks is not None else self.source.task_names()

    def eval_task_names(self) -> list[str]:
        """The tasks validate/test score: :meth:`task_names`, then the pool's unseen tasks."""
        return self.task_names() + self._unseen

    def adaptation_task_names(self) -> list[str]:
        """The tasks the adaptation stream holds: :meth:`task_names` unless :meth:`select_tasks`
        was given ``adapted`` (a model's ``adapt_tasks: unseen`` or ``all``)."""
        return list(self._adapted) if self._adapted is not None else self.task_names()

    def select_tasks(self, tasks: Sequence[str], unseen: Sequence[str] = (),
                     adapted: Sequence[str] | None = None) -> None:
        """Adapt on exactly ``tasks``, in this order (the model pool's), and evaluate on them and on
        ``unseen`` (tasks with a head but no expert); each must be in the source. ``adapted``: the
        tasks the adaptation stream holds instead of ``tasks`` (some of ``tasks`` + ``unseen``)."""
        known = self.source.task_names()
        missing = [t for t in [*tasks, *unseen] if t not in known]
        if missing:
            hints = [f"{t!r} -> {near!r}" for t in missing if (near := suggest(t, known)) is not None]
            raise ValueError(f"no data for tasks {missing} in {type(self.source).__name__} (its tasks: "
                             f"{', '.join(known)})" + (f"; did you mean {', '.join(hints)}?" if hints else ""))
        stray = [t for t in adapted or () if t not in [*tasks, *unseen]]
        if stray or (adapted is not None and not adapted):
            raise ValueError(f"adaptation tasks {list(adapted or ())} must be some of the evaluated tasks "
                             f"{[*tasks, *unseen]}")
        self._tasks, self._unseen = list(tasks), list(unseen)
        self._adapted = None if adapted is None else list(adapted)

    def check(self, num_classes: Mapping[str, int], splits: Sequence[str]) -> None:
        """Fail early, before any step, on empty splits and on labels the heads cannot have.

        Args:
            num_classes: task -> output width of its head.
            splits: the splits the run reads, checked for emptiness; the evaluation split is
                also checked against the heads (see :func:`label_count`).
        """
        for task in self.eval_task_names():
            for split in dict.fromkeys(splits):
                if split != self.eval_split and task not in self.adaptation_task_names():
                    continue  # tasks not adapted on (the unseen ones, by default) are only evaluated
                ds = self.dataset(task, split)
                if len(ds) == 0:
                    raise ValueError(f"task {task!r}: the {split!r} split is empty")
                if split != self.eval_split or task not in num_classes:
                    continue
                found, heads = label_count(ds), num_classes[task]
                if found is None:
                    continue
                count, exact = found
                if exact and count != heads:
                    raise ValueError(f"task {task!r}: the {split!r} split has {count} classes but the "
                                     f"head has {heads} outputs; wrong dataset or head?")
                if not exact and count > heads:
                    raise ValueError(f"task {task!r}: label {count - 1} in the {split!r} split is "
                                     f"outside the head's {heads} classes")

    def dataset(self, task: str, split: str) -> Dataset:
        key = (task, split)
        if key not in self._cache:
            self._cache[key] = self.source.dataset(task, split)
        return self._cache[key]

    def adaptation_dataset(self, task: str) -> Dataset:
        """What a task adapts on: the adaptation split, or its few-shot subset when ``shots`` is set
        (the stream's indices and the methods' per-image caches refer to this dataset)."""
        if self.shots is None:
            return self._corrupted(self.dataset(task, self.adapt_split), self.corruption, self.severity)
        key = (task, f"shots:{self.shots}:{self.shots_split or self.adapt_split}:{self.seed}:"
                     f"{self.corruption}:{self.severity}")
        if key not in self._cache:
            split = self.shots_split or self.adapt_split
            ds = self.dataset(task, split)
            labels = labels_of(ds)
            seed = self.seed * 1_000_003 + zlib.crc32(task.encode())
            idx = few_shot_indices(labels, self.shots, seed, name=f"task {task!r} split {split!r}")
            ds = self._corrupted(ds, self.corruption, self.severity)
            self._cache[key] = LabeledSubset(ds, idx, labels[torch.tensor(idx, dtype=torch.long)])
        return self._cache[key]

    def eval_dataset(self, task: str) -> Dataset:
        """What validate/test (and ``compare``) score: the evaluation split, corrupted when
        ``eval_corruption`` (or ``corruption``, with ``eval_corruption: same``) is set."""
        name = self.corruption if self.eval_corruption == "same" else self.eval_corruption
        return self._corrupted(self.dataset(task, self.eval_split), name, self.eval_severity or self.severity)

    def _corrupted(self, ds: Dataset, name: str | None, severity: int) -> Dataset:
        if name is None:
            return ds
        from .corruptions import CorruptedDataset
        return CorruptedDataset(ds, name, severity, seed=self.seed)

    def with_options(self, **options: Any) -> "MultiTaskDataModule":
        """A copy with some settings changed (e.g. ``shots``), sharing the loaded datasets."""
        unknown = [k for k in options if k not in ("shots", "shots_split", "batch_size", "seed")]
        if unknown:
            raise ValueError(f"data settings {unknown} cannot be changed per method "
                             "(known: shots, shots_split, batch_size, seed)")
        if options.get("shots") is not None and options["shots"] < 1:
            raise ValueError(f"data.shots must be >= 1, got {options['shots']}")
        out = copy.copy(self)
        for k, v in options.items():
            setattr(out, k, v)
        return out

    @property
    def labeled(self) -> bool:
        """Whether adaptation batches carry labels (``shots`` is set)."""
        return self.shots is not None

    def _start_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def adaptation_stream(self) -> AdaptationStream:
        """This rank's stream of adaptation batches, from the trainer's step (0 without one)."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return AdaptationStream({t: self.adaptation_dataset(t) for t in self.adaptation_task_names()},
                                self.batch_size, seed=self.seed, start_step=self._start_step(),
                                rank=rank, world_size=world, labeled=self.labeled,
                                task_steps=self.task_steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.adaptation_stream(), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)

    def _eval_loaders(self) -> list[DataLoader]:
        loaders = []
        for t in self.eval_task_names():
            ds = self.eval_dataset(t)
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
