"""Model pools: where the base encoder, the K fine-tuned experts and the K heads come from.

A pool is a small config object; :meth:`ModelPool.load` does the work and returns a
:class:`LoadedPool`. Subclasses exist for checkpoint files (:class:`CheckpointPool`), the
built-in synthetic suite (``adamerge.suites.SuitePool``) and open_clip
(``adamerge.models.OpenCLIPPool``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from jsonargparse.typing import Path_fr
from torch import nn

from ..io.checkpoints import CheckpointError, StateDict, check_finite, check_fits, load_state_dict
from ..engine.task_vectors import DTYPES, TaskVectors, select_names
from .layout import Layout, infer_layout

@dataclass
class LoadedPool:
    """Everything the merge needs, in memory.

    Attributes:
        encoder: the base module (shared features for every task).
        task_vectors: stacked ``finetuned - base`` of the merged parameters.
        heads: task -> frozen classification head applied to the encoder's output.
        expert_state: task -> callable giving that expert's full state dict (for reference rows).
        unseen_heads: heads of *unseen* tasks: evaluated on the merged model but with no expert in
            the merge and no adaptation data (the generalisation protocol of the AdaMerging paper).
        encoder_recipe: how to rebuild the encoder's architecture without any pool file (JSON;
            see :func:`adamerge.exported.build_encoder`), ``None`` when the pool cannot say.
        layout: where the encoder keeps its blocks, MLPs and attention matrices
            (:class:`~adamerge.models.layout.Layout`); read off the encoder when the pool does not
            declare it (:func:`~adamerge.models.layout.infer_layout`).
    """

    encoder: nn.Module
    task_vectors: TaskVectors
    heads: dict[str, nn.Module]
    expert_state: dict[str, Callable[[], StateDict]] = field(default_factory=dict)
    unseen_heads: dict[str, nn.Module] = field(default_factory=dict)
    encoder_recipe: dict | None = None
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = infer_layout(self.encoder)
        tasks = self.task_vectors.task_names
        if list(self.heads) != list(tasks):
            raise ValueError(f"heads are for tasks {list(self.heads)}, but the task vectors are for "
                             f"{tasks}: need one head per task, in the same order")
        both = [t for t in self.unseen_heads if t in self.heads]
        if both:
            raise ValueError(f"tasks {both} are both merged (they have an expert) and unseen; "
                             "a task is one or the other")

    @property
    def unseen_tasks(self) -> list[str]:
        """Tasks evaluated but not merged (no expert), in order."""
        return list(self.unseen_heads)

    @property
    def eval_tasks(self) -> list[str]:
        """Every task with a head: the merged ones, then the unseen ones."""
        return list(self.task_vectors.task_names) + self.unseen_tasks


class ModelPool(ABC):
    """Base class of model pools. Subclasses implement :meth:`load`."""

    @abstractmethod
    def load(self) -> LoadedPool:
        """The base encoder, the task vectors and the heads."""


def merged_parameter_names(module: nn.Module, include: Sequence[str] | None = None,
                           exclude: Sequence[str] | None = None) -> list[str]:
    """Floating-point parameters of ``module`` filtered by ``include``/``exclude`` globs."""
    names = select_names([n for n, p in module.named_parameters() if p.is_floating_point()],
                         include, exclude)
    if not names:
        raise ValueError(f"no parameter of {type(module).__name__} matches include={include} "
                         f"exclude={exclude}")
    return names


def check_unseen(unseen: Sequence[str] | None, merged: Sequence[str], known: Sequence[str] | None = None,
                 where: str = "") -> list[str]:
    """The unseen-task list of a pool, checked: no duplicates, none merged, each known (if given)."""
    unseen = list(unseen or [])
    dup = sorted({t for t in unseen if unseen.count(t) > 1})
    if dup:
        raise ValueError(f"unseen_tasks lists {dup} more than once")
    both = [t for t in unseen if t in merged]
    if both:
        raise ValueError(f"unseen_tasks {both} also have an expert{where}: a task is merged or unseen, "
                         "not both")
    if known is not None:
        from ..errors import unknown_name
        for t in unseen:
            if t not in known:
                raise ValueError(unknown_name("unseen task", t, list(known), where=where))
    return unseen


def linear_heads_from_state(state: Mapping[str, torch.Tensor], tasks: Sequence[str],
                            source: str = "heads") -> dict[str, nn.Module]:
    """Frozen ``nn.Linear`` heads from ``{task}.weight`` (``[classes, dim]``) and optional ``{task}.bias``."""
    heads = {}
    for task in tasks:
        if f"{task}.weight" not in state:
            raise CheckpointError(f"{source}: no head for task {task!r} (expected key "
                                  f"'{task}.weight'; found {sorted(state)[:6]})")
        w = state[f"{task}.weight"]
        if w.ndim != 2:
            raise CheckpointError(f"{source}: '{task}.weight' has shape {tuple(w.shape)}, expected "
                                  "[num_classes, feature_dim]")
        b = state.get(f"{task}.bias")
        check_finite(state, source, [f"{task}.weight", f"{task}.bias"])
        head = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            head.weight.copy_(w)
            if b is not None:
                head.bias.copy_(b)
        heads[task] = head.requires_grad_(False)
    return heads


class CheckpointPool(ModelPool):
    """Any ``nn.Module`` architecture with weights from files.

    File paths written in a config file are relative to that file (on the command line: to the
    working directory); they must exist when the config is read.

    Args:
        model: the architecture (its own weights are replaced by ``base``).
        base: state dict file of the pretrained model (``.safetensors`` or a torch file).
        experts: task name -> state dict file of the model fine-tuned on that task.
        heads: file with ``{task}.weight`` / ``{task}.bias`` linear heads over the model's output.
        include: globs of parameter names to merge (default: every floating-point parameter).
        exclude: globs of parameter names not to merge (they keep the base value).
        task_vector_dtype: storage dtype of the task vectors (float32, bfloat16, float16).
        allow_pickle: allow torch files holding pickled objects (runs code from the file).
        unseen_tasks: tasks evaluated on the merged model without an expert (their heads must be
            in ``heads``); reports mark them as unseen.
    """

    def __init__(self, model: nn.Module, base: Path_fr, experts: dict[str, Path_fr], heads: Path_fr,
                 include: list[str] | None = None, exclude: list[str] | None = None,
                 task_vector_dtype: str | None = None, allow_pickle: bool = False,
                 unseen_tasks: list[str] | None = None) -> None:
        if not experts:
            raise ValueError("CheckpointPool needs at least one expert file, got none")
        self.model = model
        self.base, self.heads = as_path(base), as_path(heads)
        self.experts = {t: as_path(p) for t, p in experts.items()}
        self.include, self.exclude = include, exclude
        if task_vector_dtype is not None and task_vector_dtype not in DTYPES:
            raise ValueError(f"task_vector_dtype must be one of {list(DTYPES)}, got {task_vector_dtype!r}")
        self.task_vector_dtype = task_vector_dtype
        self.allow_pickle = allow_pickle
        self.unseen_tasks = check_unseen(unseen_tasks, list(self.experts))

    def load(self) -> LoadedPool:
        module = self.model
        target = type(module).__name__
        base = load_state_dict(self.base, self.allow_pickle)
        check_fits(module.state_dict(), base, str(self.base), target)
        params = [n for n, _ in module.named_parameters()]  # buffers (masks) may hold -inf on purpose
        check_finite(base, str(self.base), params)
        try:
            module.load_state_dict(base)
        except RuntimeError as exc:  # what check_fits does not see (e.g. a dtype that cannot be copied)
            raise CheckpointError(f"{self.base} does not fit {target}: "
                                  + " ".join(str(exc).split())) from exc
        names = merged_parameter_names(module, self.include, self.exclude)
        experts = {}
        for t, p in self.experts.items():
            experts[t] = load_state_dict(p, self.allow_pickle)
            check_finite(experts[t], str(p), [n for n in params if n in experts[t]])
        dtype = DTYPES[self.task_vector_dtype] if self.task_vector_dtype else None
        tv = TaskVectors.from_state_dicts(base, experts, names=names, dtype=dtype)
        del experts
        head_state = load_state_dict(self.heads, self.allow_pickle)
        heads = linear_heads_from_state(head_state, list(self.experts), source=str(self.heads))
        unseen = linear_heads_from_state(head_state, self.unseen_tasks, source=str(self.heads))
        loaders = {t: (lambda p=p: load_state_dict(p, self.allow_pickle))
                   for t, p in self.experts.items()}
        return LoadedPool(module, tv, heads, loaders, unseen_heads=unseen)


def as_path(path: str | os.PathLike) -> Path:
    """A ``pathlib.Path`` of a str or of a jsonargparse path (already resolved against its config)."""
    return Path(os.fspath(path)).expanduser()


def resolve(path: str | Path, root: str | Path | None) -> Path:
    """``path`` relative to ``root`` unless absolute (config paths are relative to the config)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root) / p


class PreloadedPool(ModelPool):
    """A pool already in memory (to run several methods on one load)."""

    def __init__(self, loaded: LoadedPool) -> None:
        self.loaded = loaded

    def load(self) -> LoadedPool:
        return self.loaded
