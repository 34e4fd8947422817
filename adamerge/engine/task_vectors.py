"""Task vectors: ``tau_k = finetuned_k - base``, stacked per parameter as ``[K, *shape]``.

Stacking the K task vectors of one parameter in one tensor lets the merge and its backward be
one matrix-vector product per parameter instead of K small ops.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from ..io.checkpoints import CheckpointError, StateDict, check_compatible, check_finite, write_json_atomic
from ..io.tensor_stack import DTYPE_CODES, StackWriter, TensorReader, read_header, read_stack

log = logging.getLogger(__name__)

# Storage dtypes of task vectors, by the names configs use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The "format" of a streamed task-vector file's metadata (TaskVectors.streamed).
STACK_FORMAT = "adamerge.task_vectors/1"


def select_names(names: Iterable[str], include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None) -> list[str]:
    """Names matching any ``include`` glob (all if None) and no ``exclude`` glob, in order."""
    chosen = [n for n in names
              if (include is None or any(fnmatch.fnmatchcase(n, p) for p in include))
              and not any(fnmatch.fnmatchcase(n, p) for p in (exclude or ()))]
    return chosen


@dataclass
class TaskVectors:
    """K task vectors over P parameters.

    Attributes:
        task_names: the K tasks, in coefficient-column order.
        names: the P merged parameter names, in coefficient-row order.
        tensors: P tensors, ``tensors[p]`` has shape ``[K, *shape_p]``.
        norms: ``norms[k][p]``, the norm of task k's vector of parameter p, when known without
            reading the tensors (a streamed stack records them as it writes): :meth:`fingerprint`
            then reads no task-vector byte, and each rank of a sharded run only the rows it keeps.
    """

    task_names: list[str]
    names: list[str]
    tensors: list[torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    norms: list[list[float]] | None = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.tensors):
            raise ValueError(f"{len(self.names)} names for {len(self.tensors)} tensors")
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task names must be unique, got {self.task_names}")
        for name, t in zip(self.names, self.tensors):
            if t.shape[0] != len(self.task_names):
                raise ValueError(f"task vector {name!r} stacks {t.shape[0]} tasks, "
                                 f"expected {len(self.task_names)}")

    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor],
                         experts: Mapping[str, Mapping[str, torch.Tensor]],
                         names: Sequence[str] | None = None,
                         dtype: torch.dtype | None = None) -> "TaskVectors":
        """Subtract ``base`` from each expert state dict.

        Args:
            base: the pretrained state dict.
            experts: task name -> fine-tuned state dict (same keys, shapes and dtypes as ``base``).
            names: keys to merge; default every floating-point tensor of ``base``.
            dtype: storage dtype of the task vectors (default: that of each base tensor).
        """
        if not experts:
            raise ValueError("at least one fine-tuned model is needed, got none")
        for task, sd in experts.items():
            check_compatible(base, sd, other_name=f"fine-tuned model {task!r}")
        if names is None:
            names = [n for n, t in base.items() if t.is_floating_point()]
        _check_names(base, names)
        tasks = list(experts)
        tensors = []
        for n in names:
            b = base[n].detach()
            # Subtract in float32 (or wider) so low-precision storage rounds once, not twice.
            work = torch.promote_types(b.dtype, torch.float32)
            stacked = torch.stack([experts[t][n].detach().to(work) - b.to(work) for t in tasks])
            tensors.append(stacked.to(dtype or b.dtype))
        return cls(task_names=tasks, names=list(names), tensors=tensors)

    @classmethod
    def streamed(cls, base: Mapping[str, torch.Tensor], experts: Mapping[str, TensorReader],
                 names: Sequence[str], path: str | os.PathLike, dtype: torch.dtype | None = None,
                 metadata: Mapping[str, str] | None = None, progress: bool = True) -> "TaskVectors":
        """Task vectors formed one parameter at a time into the safetensors file ``path`` and
        returned as views of its memory map: host memory holds the base and one expert tensor at
        a time, never the K experts (the pages of the file are read when touched).

        For each name, each expert's tensor is read, the base subtracted in float32 (as
        :meth:`from_state_dicts` does, so low-precision storage rounds once), and the result
        appended to the ``[K, *shape]`` stack of the file. A file already at ``path`` whose
        metadata (``metadata``, task order, names, dtype) and shapes match is reused as it is;
        otherwise it is rewritten (atomically). One log line says which.

        Args:
            base: the pretrained state dict.
            experts: task name -> reader of that expert's tensors under the names of ``base``
                (:class:`~adamerge.io.tensor_stack.TensorReader`).
            names: the parameters to merge (floating-point tensors of ``base``).
            path: the task-vector file.
            dtype: storage dtype (default: that of each base tensor).
            metadata: provenance (string map) a reused file must match, e.g. source files.
            progress: a progress bar over parameters on a terminal when it takes a while.
        """
        if not experts:
            raise ValueError("at least one fine-tuned model is needed, got none")
        tasks, names, path = list(experts), list(names), Path(path)
        _check_names(base, names)
        _check_expert_shapes(base, experts, names)
        out = {n: dtype or base[n].dtype for n in names}
        specs = {n: (out[n], (len(tasks), *base[n].shape)) for n in names}
        meta = {**(metadata or {}), "format": STACK_FORMAT, "tasks": json.dumps(tasks),
                "names": json.dumps(names), "dtype": ",".join(sorted({str(d) for d in out.values()}))}
        stale = _stale_reason(path, meta, specs)
        if stale is None:
            log.info("adamerge: task vectors reused from %s (sources, tasks, names and dtype match)", path)
        else:
            log.info("adamerge: task vectors written to %s (%s)", path, stale)
            _write_stack(base, experts, path, specs, meta, progress)
        tensors, _ = read_stack(path)
        return cls(task_names=tasks, names=names, tensors=[tensors[n] for n in names],
                   meta={"task_vector_file": str(path)}, norms=_recorded_norms(path, tasks, names))

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_params(self) -> int:
        return len(self.names)

    def nbytes(self) -> int:
        """Bytes held by the stacked task vectors."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def numel(self) -> int:
        """Scalar entries per task."""
        return sum(t[0].numel() for t in self.tensors)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "TaskVectors":
        """A copy on another device and/or storage dtype (self is left as it is; recorded norms
        carry over a device move, not a dtype change)."""
        return TaskVectors(self.task_names, list(self.names),
                           [t.to(device=device, dtype=dtype) for t in self.tensors], dict(self.meta),
                           norms=self.norms if dtype is None else None)

    def task(self, k: int | str) -> StateDict:
        """The task vector of one task as a state dict (views, no copy)."""
        i = self.task_names.index(k) if isinstance(k, str) else k
        return {n: t[i] for n, t in zip(self.names, self.tensors)}

    def fingerprint(self) -> dict:
        """Names, shapes, task order and a content hash, to refuse resuming on another pool.

        The hash covers per-task per-parameter norms rounded to 4 significant digits, so it
        is stable across devices and summation orders but changes with any real weight change.
        """
        norms = self.norms or [[float(t[k].double().norm()) for t in self.tensors] for k in range(self.num_tasks)]
        digest = hashlib.sha256(json.dumps(
            [[f"{x:.4g}" for x in row] for row in norms]).encode()).hexdigest()[:16]
        return {
            "tasks": list(self.task_names),
            "params": {n: list(t.shape[1:]) for n, t in zip(self.names, self.tensors)},
            "task_norms": {task: f"{sum(x * x for x in row) ** 0.5:.4g}"
                           for task, row in zip(self.task_names, norms)},
            "hash": digest,
            **({"transform": self.meta["transform"]} if "transform" in self.meta else {}),
        }


def _check_names(base: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    for n in names:
        if n not in base:
            raise CheckpointError(f"parameter {n!r} to merge is not in the base model")
        if not base[n].is_floating_point():
            raise CheckpointError(f"parameter {n!r} has dtype {base[n].dtype}; only "
                                  "floating-point tensors can be merged")


def _check_expert_shapes(base: Mapping[str, torch.Tensor], experts: Mapping[str, TensorReader],
                         names: Sequence[str]) -> None:
    """Every expert has every name, shaped as the base (read from the file headers, before any
    byte is written)."""
    for task, reader in experts.items():
        for n in names:
            try:
                shape = tuple(reader.shape(n))
            except CheckpointError as exc:
                raise CheckpointError(f"fine-tuned model {task!r}: {exc}") from exc
            if shape != tuple(base[n].shape):
                raise CheckpointError(f"fine-tuned model {task!r}: {reader.where(n)} has shape {shape}, "
                                      f"the base's {n!r} has {tuple(base[n].shape)}")


def _stale_reason(path: Path, meta: Mapping[str, str],
                  specs: Mapping[str, tuple[torch.dtype, Sequence[int]]]) -> str | None:
    """Why the task-vector file at ``path`` cannot be reused (``None``: it can)."""
    if not path.is_file():
        return "no file yet"
    try:
        header, saved = read_header(path)
    except (CheckpointError, OSError) as exc:
        return f"the old file is unreadable: {exc}"
    first = ["format", "tasks", "names", "dtype", "base", "experts"]  # the likelier causes first
    for key in sorted(set(meta) | set(saved), key=lambda k: (first.index(k) if k in first else len(first), k)):
        if key == "sources":
            changed = _changed_source(saved.get(key), meta.get(key))
            if changed:
                return f"{changed} changed"
        elif saved.get(key) != meta.get(key):
            return f"{key} changed"
    for name, (dtype, shape) in specs.items():
        info = header.get(name, {})
        if info.get("dtype") != DTYPE_CODES[dtype] or list(info.get("shape", [])) != list(shape):
            return f"tensor {name!r} is {info.get('dtype')} {info.get('shape')}, expected {dtype} {list(shape)}"
    return None


def _changed_source(saved: str | None, now: str | None) -> str | None:
    """The first source file whose size or modification time differs (whatever the order they are
    listed in), for the log line; ``None`` when none does."""
    try:
        old, new = json.loads(saved or "{}"), json.loads(now or "{}")
    except ValueError:
        return "sources"
    for f in list(new) + [f for f in old if f not in new]:
        if old.get(f) != new.get(f):
            return f"source file {f}"
    return None


def norms_file(path: Path) -> Path:
    """The JSON beside a task-vector stack that records each task's norm per parameter."""
    return path.with_name(path.name + ".norms.json")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recorded_norms(path: Path, tasks: Sequence[str], names: Sequence[str]) -> list[list[float]] | None:
    """The norms recorded for the stack at ``path`` (``[task][parameter]``), or ``None`` when the
    record is missing or was written for another file (then they are computed from the tensors)."""
    try:
        record = json.loads(norms_file(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("stack") != _stamp(path) or record.get("tasks") != list(tasks) or \
            record.get("names") != list(names):
        return None
    return record["norms"]


def _write_stack(base: Mapping[str, torch.Tensor], experts: Mapping[str, TensorReader], path: Path,
                 specs: Mapping[str, tuple[torch.dtype, Sequence[int]]], meta: Mapping[str, str],
                 progress: bool) -> None:
    """Stream ``tau_k = expert_k - base`` into ``path``, one expert tensor in memory at a time, and
    record each stored tensor's norm beside it (:func:`norms_file`)."""
    norms: dict[str, dict[str, float]] = {t: {} for t in experts}
    with StackWriter(path, specs, meta) as writer:
        for name in _progress(writer.order, progress, path):
            b = base[name].detach()
            # Subtract in float32 (or wider) so low-precision storage rounds once, not twice.
            work = torch.promote_types(b.dtype, torch.float32)
            bw = b.to(work)
            for task, reader in experts.items():
                x = reader.read(name)
                check_finite({name: x}, f"fine-tuned model {task!r}: {reader.where(name)}")
                tau = (x.to(work) - bw).to(specs[name][0])
                norms[task][name] = float(tau.double().norm())  # as fingerprint() computes it
                writer.write(name, tau)
                del x, tau  # drop the expert's tensor (and the file map behind it) before the next
    names = list(specs)
    write_json_atomic({"stack": _stamp(path), "tasks": list(experts), "names": names,
                       "norms": [[norms[t][n] for n in names] for t in experts]}, norms_file(path), indent=None)


def _progress(names: Sequence[str], show: bool, path: Path) -> Iterator[str]:
    """A tqdm bar over the parameters, on a terminal and only once it has run a second."""
    from tqdm import tqdm
    return iter(tqdm(names, desc=f"task vectors -> {path.name}", unit="param", leave=False,
                     disable=None if show else True, delay=1.0))


def fingerprint_difference(saved: dict, current: dict) -> str | None:
    """Describe how two fingerprints differ, or None if they match."""
    if saved.get("tasks") != current.get("tasks"):
        return f"tasks {saved.get('tasks')} (checkpoint) vs {current.get('tasks')} (now)"
    sp, cp = saved.get("params", {}), current.get("params", {})
    if list(sp) != list(cp):
        missing = [n for n in sp if n not in cp][:3]
        extra = [n for n in cp if n not in sp][:3]
        return (f"merged parameters differ: only in checkpoint {missing}, only now {extra}"
                if missing or extra else "merged parameters are in a different order")
    for n in sp:
        if list(sp[n]) != list(cp[n]):
            return f"parameter {n!r}: shape {sp[n]} (checkpoint) vs {cp[n]} (now)"
    if saved.get("transform") != current.get("transform"):
        return f"task-vector transform {saved.get('transform')!r} (checkpoint) vs {current.get('transform')!r} (now)"
    if saved.get("hash") != current.get("hash"):
        sn, cn = saved.get("task_norms", {}), current.get("task_norms", {})
        diff = [t for t in sn if sn[t] != cn.get(t)]
        return ("weights differ" + (f" for tasks {diff}" if diff else "") +
                " (task-vector norms do not match the checkpoint's)")
    return None
