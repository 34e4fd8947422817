"""Task vectors: ``tau_k = finetuned_k - base``, stacked per parameter as ``[K, *shape]``.

Stacking the K task vectors of one parameter in one tensor lets the merge and its backward be
one matrix-vector product per parameter instead of K small ops.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from ..io.checkpoints import CheckpointError, StateDict, check_compatible

# Storage dtypes of task vectors, by the names configs use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """

    task_names: list[str]
    names: list[str]
    tensors: list[torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

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
        for n in names:
            if n not in base:
                raise CheckpointError(f"parameter {n!r} to merge is not in the base model")
            if not base[n].is_floating_point():
                raise CheckpointError(f"parameter {n!r} has dtype {base[n].dtype}; only "
                                      "floating-point tensors can be merged")
        tasks = list(experts)
        tensors = []
        for n in names:
            b = base[n].detach()
            # Subtract in float32 (or wider) so low-precision storage rounds once, not twice.
            work = torch.promote_types(b.dtype, torch.float32)
            stacked = torch.stack([experts[t][n].detach().to(work) - b.to(work) for t in tasks])
            tensors.append(stacked.to(dtype or b.dtype))
        return cls(task_names=tasks, names=list(names), tensors=tensors)

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
        """A copy on another device and/or storage dtype (self is left as it is)."""
        return TaskVectors(self.task_names, list(self.names),
                           [t.to(device=device, dtype=dtype) for t in self.tensors], dict(self.meta))

    def task(self, k: int | str) -> StateDict:
        """The task vector of one task as a state dict (views, no copy)."""
        i = self.task_names.index(k) if isinstance(k, str) else k
        return {n: t[i] for n, t in zip(self.names, self.tensors)}

    def fingerprint(self) -> dict:
        """Names, shapes, task order and a content hash, to refuse resuming on another pool.

        The hash covers per-task per-parameter norms rounded to 4 significant digits, so it
        is stable across devices and summation orders but changes with any real weight change.
        """
        norms = [[float(t[k].double().norm()) for t in self.tensors] for k in range(self.num_tasks)]
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
