"""Benchmark datasets for CLIP: Hugging Face datasets, ``save_to_disk`` folders, image folders.

:class:`HFSource` is the ``DatasetSource`` of the registry tasks (:mod:`adamerge.data.tasks`). Images
go through open_clip's evaluation transform of the model in use. Decoding (JPEG/PNG + resize +
crop) dominates a GPU step, so by default each (task, split) is decoded once into a cache of
``uint8`` images after the geometric transforms (``[N, 3, H, W]``, a memory-mapped ``.npy`` file
on disk, or a tensor in memory); normalisation is applied when an item is read. The cache key
hashes the dataset's identity (Hugging Face fingerprint, or file names/sizes/mtimes of an image
folder) and the transform, so a different model resolution or dataset version gets its own cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import offline
from ..io.checkpoints import atomic_write
from .datamodule import DatasetSource
from .tasks import TaskSpec, get_task, load_registry, resolve_tasks

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CACHE_VERSION = 1


# ------------------------------------------------------------------------ raw images
class RawImages(ABC):
    """Undecoded items of one split: ``len``, ``image(i)`` (PIL), ``labels()``, ``identity()``."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of items."""

    @abstractmethod
    def image(self, i: int):
        """Item ``i`` as a PIL image."""

    @abstractmethod
    def label(self, i: int) -> int:
        """Class index of item ``i``."""

    def labels(self) -> np.ndarray:
        return np.array([self.label(i) for i in range(len(self))], dtype=np.int64)

    @abstractmethod
    def identity(self) -> str:
        """A string that changes when the items change (part of the decoded-image cache key)."""


def _pil(value: Any, where: str):
    from PIL import Image
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"{where}: cannot read an image from a {type(value).__name__}")


class HFImages(RawImages):
    """One split of a ``datasets.Dataset``."""

    def __init__(self, ds, image_column: str, label_column: str, name: str) -> None:
        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise KeyError(f"{name}: no column {col!r}; columns are {ds.column_names} (set "
                               "image_column / label_column of the task in a tasks_file)")
        self.ds, self.image_column, self.label_column, self.name = ds, image_column, label_column, name
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def image(self, i: int):
        return _pil(self.ds[i][self.image_column], f"{self.name}[{i}]")

    def label(self, i: int) -> int:
        return int(self.labels()[i])

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray([int(v) for v in self.ds[self.label_column]], dtype=np.int64)
        return self._labels

    def identity(self) -> str:
        fp = getattr(self.ds, "_fingerprint", None)
        return f"hf:{fp}:{len(self.ds)}:{self.image_column}:{self.label_column}"


class FolderImages(RawImages):
    """``root/<class>/<image>``; class folders are registry class names or class indices."""

    def __init__(self, root: Path, classnames: Sequence[str]) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: image folder does not exist")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not folders:
            raise FileNotFoundError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        if all(f in classnames for f in folders):
            index = {c: i for i, c in enumerate(classnames)}
        elif all(f.isdigit() and int(f) < len(classnames) for f in folders):
            index = {f: int(f) for f in folders}
        else:
            odd = [f for f in folders if f not in classnames][:4]
            raise ValueError(f"{root}: class folders {odd} are neither class names of the task "
                             f"(e.g. {list(classnames)[:3]}) nor class indices < {len(classnames)}")
        self.root = root
        self.items = [(p, index[f]) for f in folders for p in sorted((root / f).iterdir())
                      if p.suffix.lower() in IMAGE_EXTENSIONS]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int):
        from PIL import Image
        return Image.open(self.items[i][0])

    def label(self, i: int) -> int:
        return self.items[i][1]

    def identity(self) -> str:
        h = hashlib.sha256()
        for p, y in self.items:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns}:{y}\n".encode())
        return f"folder:{self.root.resolve()}:{h.hexdigest()}"


# ------------------------------------------------------------------------- transforms
def split_transform(transform) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """Split open_clip's eval transform into (PIL stage, mean, std) around ToTensor + Normalize."""
    from torchvision import transforms as T
    steps = list(getattr(transform, "transforms", []))
    names = [type(s).__name__ for s in steps]
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or "ToTensor" not in names[-2]:
        raise ValueError(f"cannot cache images for transform {names}: expected it to end with "
                         "ToTensor, Normalize (use image_cache: none)")
    mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(steps[-1].std, dtype=torch.float32).view(-1, 1, 1)
    return T.Compose(steps[:-2]), mean, std


def _to_uint8(img) -> np.ndarray:
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- datasets
class TransformedImages(Dataset):
    """``(transform(image), label)`` decoded on every access (``image_cache: none``)."""

    def __init__(self, raw: RawImages, transform: Callable) -> None:
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int):
        return self.transform(self.raw.image(i)), self.raw.label(i)


class CachedImages(Dataset):
    """``(normalised image, label)`` from a uint8 cache filled once from ``raw``.

    Args:
        raw: the undecoded split.
        transform: open_clip eval transform (PIL stage, then ToTensor + Normalize).
        mode: ``disk`` (a ``.npy`` under ``cache_root``, memory-mapped, shared by processes and
            runs) or ``memory`` (a tensor, this process only).
        cache_root: folder of disk caches.
        threads: decoding threads used to fill the cache.
        name: shown in logs and errors.
    """

    def __init__(self, raw: RawImages, transform: Callable, mode: Literal["disk", "memory"],
                 cache_root: Path | None = None, threads: int = 8, name: str = "dataset") -> None:
        self.raw, self.name = raw, name
        self.pil_stage, self.mean, self.std = split_transform(transform)
        self.labels = torch.from_numpy(raw.labels())
        self.key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "data": raw.identity(),
                                              "transform": repr(self.pil_stage)}).encode()).hexdigest()[:24]
        self.path: Path | None = None
        if mode == "disk":
            if cache_root is None:
                raise ValueError("disk image cache needs a cache folder")
            self.path = Path(cache_root) / f"{name}-{self.key}.npy"
            if not self.path.is_file():
                self._fill_disk(threads)
            self.images = np.load(self.path, mmap_mode="r")
            if self.images.shape[0] != len(raw):
                raise ValueError(f"{self.path}: cache holds {self.images.shape[0]} images, the dataset "
                                 f"has {len(raw)}; delete the file to rebuild it")
        elif mode == "memory":
            self.images = self._decode_all(threads, out=None)
        else:
            raise ValueError(f"image cache mode must be 'disk', 'memory' or 'none', got {mode!r}")

    def _decode(self, i: int) -> np.ndarray:
        return _to_uint8(self.pil_stage(self.raw.image(i)))

    def _decode_all(self, threads: int, out: np.ndarray | None) -> np.ndarray:
        n = len(self.raw)
        if n == 0:
            raise ValueError(f"{self.name}: the dataset is empty")
        first = self._decode(0)
        if out is None:
            out = np.empty((n, *first.shape), dtype=np.uint8)
        out[0] = first

        def fill(i: int) -> None:
            arr = self._decode(i)
            if arr.shape != first.shape:
                raise ValueError(f"{self.name}[{i}]: transformed image has shape {arr.shape}, "
                                 f"item 0 has {first.shape}; the transform must give a fixed size")
            out[i] = arr

        log.info("decoding %d images of %s once into the image cache", n, self.name)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(fill, range(1, n), chunksize=64))
        return out

    def _fill_disk(self, threads: int) -> None:
        assert self.path is not None
        probe = self._decode(0)
        with atomic_write(self.path) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(self.raw), *probe.shape))
            self._decode_all(threads, out=arr)
            arr.flush()
            del arr

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.images[i], copy=True)).float().div_(255.0)
        return (x - self.mean) / self.std, int(self.labels[i])


# ------------------------------------------------------------------------------- source
def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


class HFSource(DatasetSource):
    """Registry tasks as datasets, preprocessed for an open_clip model.

    Args:
        tasks: task names in order (registry names or aliases), or a suite name (``tall8``,
            ``tall14``, ``tall20``). Must list the same tasks, in the same order, as the pool.
        model: open_clip model name (its eval transform is used).
        pretrained: pretrained tag or file of the model (the tag sets mean/std/interpolation).
        tasks_file: YAML file of extra / overriding tasks.
        paths: task -> local dataset (a ``datasets.save_to_disk`` folder, or an image folder laid
            out ``<path>/<split>/<class>/<image>``), overriding the registry's ``hf_path``.
        image_cache: ``disk`` (decode once into ``cache_dir``; default), ``memory`` or ``none``.
        cache_dir: folder of the image cache (default ``$ADAMERGE_CACHE/images``).
        hf_cache_dir: ``cache_dir`` passed to ``datasets.load_dataset``.
        decode_threads: threads that decode images when filling the cache.
    """

    def __init__(self, tasks: list[str] | str, model: str = "ViT-B-32",
                 pretrained: str | None = "openai", tasks_file: str | None = None,
                 paths: dict[str, str] | None = None,
                 image_cache: Literal["disk", "memory", "none"] = "disk",
                 cache_dir: str | None = None, hf_cache_dir: str | None = None,
                 decode_threads: int = 8) -> None:
        registry = load_registry(tasks_file)
        if isinstance(tasks, str):
            self.names = [s.name for s in resolve_tasks(tasks, registry)]
        else:
            self.names = list(tasks)
        self.specs: dict[str, TaskSpec] = {t: get_task(t, registry) for t in self.names}
        self.paths = {t: Path(p).expanduser() for t, p in (paths or {}).items()}
        unknown = [t for t in self.paths if t not in self.specs]
        if unknown:
            raise KeyError(f"paths given for tasks {unknown} that are not in tasks {self.names}")
        for t in self.names:  # local datasets are checked now, before anything downloads
            local = self._local(t)
            if local is not None and not local.exists():
                raise FileNotFoundError(f"{local}: dataset path of task {t!r} does not exist")
        if image_cache not in ("disk", "memory", "none"):
            raise ValueError(f"image_cache must be 'disk', 'memory' or 'none', got {image_cache!r}")
        self.model, self.pretrained = model, pretrained
        self.image_cache, self.hf_cache_dir, self.decode_threads = image_cache, hf_cache_dir, decode_threads
        if cache_dir:
            self.cache_dir = Path(cache_dir).expanduser()
        else:
            from ..io.cache import default_cache_dir
            self.cache_dir = default_cache_dir() / "images"
        self._transform = None

    def task_names(self) -> list[str]:
        return list(self.names)

    @property
    def transform(self):
        if self._transform is None:
            from .transforms import clip_transform
            self._transform = clip_transform(self.model, self.pretrained)
        return self._transform

    def raw(self, task: str, split: str) -> RawImages:
        """The undecoded images and labels of ``task``'s ``split``."""
        if task not in self.specs:
            raise KeyError(f"task {task!r} is not one of this source's tasks {self.names}")
        spec = self.specs[task]
        name = f"{task}/{split}"
        local = self._local(task)
        if local is not None:
            if not local.exists():
                raise FileNotFoundError(f"{local}: dataset path of task {task!r} does not exist")
            if _is_saved_dataset(local):
                import datasets
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if spec.split(split) not in ds:
                        raise KeyError(f"{local}: no split {spec.split(split)!r} (task {task!r}); "
                                       f"splits: {list(ds)}")
                    ds = ds[spec.split(split)]
                return HFImages(ds, spec.image_column, spec.label_column, name)
            return FolderImages(local / spec.split(split), spec.classnames)
        import datasets
        ident = spec.hf_path + (f" ({spec.hf_name})" if spec.hf_name else "")
        what = f"task {task!r}: the Hugging Face dataset {ident}, split {spec.split(split)!r},"
        hint = (f"give a local copy instead (`paths: {{{task}: DIR}}` in the data source of a config, "
                f"`--data DIR` for finetune): a save_to_disk folder, made once where there is a network "
                f"with `datasets.load_dataset({spec.hf_path!r}).save_to_disk(DIR)`, or an image folder "
                "DIR/<split>/<class>/<image>")
        with offline.download_or_cache(what, hint, datasets=True):
            ds = datasets.load_dataset(spec.hf_path, spec.hf_name, split=spec.split(split),
                                       cache_dir=self.hf_cache_dir)
        return HFImages(ds, spec.image_column, spec.label_column, name)

    def _local(self, task: str) -> Path | None:
        """The local dataset of ``task`` (``paths``, else the task's ``path``), or None."""
        spec = self.specs[task]
        return self.paths.get(task) or (Path(spec.path).expanduser() if spec.path else None)

    def dataset(self, task: str, split: str) -> Dataset:
        raw = self.raw(task, split)
        if self.image_cache == "none":
            return TransformedImages(raw, self.transform)
        return CachedImages(raw, self.transform, self.image_cache, self.cache_dir,
                            threads=self.decode_threads, name=f"{task}-{split}")
