"""LiNeS (Layer-increasing Network Scaling): the merged task vector scaled by a factor that rises
linearly with the depth of the block it belongs to, so shallow layers stay near the average of the
experts (or the base) and deep layers take the full multi-task vector.

A static merge (``f(task_vectors, base, **hparams) -> {name: merged tensor}``). A static merge
receives the task vectors and the base weights only, not the pool's
:attr:`~adamerge.models.pool.LoadedPool.layout`; the depth of each parameter is read off its name
(:func:`block_depths`, the official code's own rule, generalised), or from ``blocks`` when given
(e.g. ``loaded.layout.blocks`` from Python).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..engine.task_vectors import TaskVectors
from .static import ties_task_vectors

_MERGES = ("sum", "ties")  # the official method names (config/method/sum.yaml, ties.yaml)


def block_depths(names: Sequence[str], blocks: Sequence[str] | None = None) -> dict[str, float]:
    """``{parameter: depth fraction in [0, 1]}`` for the parameters inside a transformer block:
    block ``i`` of ``B`` is at ``i / (B - 1)`` (a single block at 1.0); parameters outside every
    block are left out.

    ``blocks``: the blocks' qualified names in order (a pool's ``layout.blocks``). Without it they
    are read off the names: a block is a name prefix ending in an integer component
    (``blocks.3``, ``visual.transformer.resblocks.3``, ``model.layers.3``), grouped by the list
    it indexes (``blocks``, ``visual.transformer.resblocks``, ...); the list with the most blocks
    is the stack, ordered by index, as the official code finds blocks by the substring ``.{i}.``
    (wang-kee/LiNeS ``src/eval/eval.py`` L79-86). Blocks of other lists count as outside.
    """
    if blocks is None:
        lists: dict[str, set[int]] = {}
        for name in names:
            parts = name.split(".")
            at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            if at is not None:
                lists.setdefault(".".join(parts[:at]), set()).add(int(parts[at]))
        if not lists:
            return {}
        stack = max(lists, key=lambda path: len(lists[path]))  # first of the longest on ties
        blocks = [f"{stack}.{i}" if stack else str(i) for i in sorted(lists[stack])]
    last = max(len(blocks) - 1, 1)
    depth = {}
    for name in names:
        for i, block in enumerate(blocks):
            if name.startswith(f"{block}."):
                depth[name] = i / last if len(blocks) > 1 else 1.0
                break
    return depth


def _multitask_vectors(task_vectors: TaskVectors, merge: str, keep: float) -> list[torch.Tensor]:
    """Per parameter the unscaled multi-task vector: the sum of the task vectors (``sum``, task
    arithmetic's) or TIES's disjoint mean of the trimmed, sign-elected ones (``ties``)."""
    if merge == "sum":
        return [tau.float().sum(0) for tau in task_vectors.tensors]
    selected = ties_task_vectors(task_vectors, keep)
    return [tau.float().sum(0) / (tau != 0).sum(0).clamp(min=1) for tau in selected.tensors]


def lines(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], scaling: float = 0.5,
          alpha: float | None = None, merge: str = "sum", keep: float = 0.2,
          blocks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """LiNeS on a multi-task vector: ``base + (alpha + scaling * depth) * tau_MTL`` per parameter,
    ``depth`` in [0, 1] from the first block to the last; parameters outside the blocks (patch
    embedding, final norm and projection) get ``alpha``.

    Follows wang-kee/LiNeS (commit 43a7bdd) ``src/eval/eval.py``: ``LiNeS_scaling`` (L56-97)
    scales the keys of block ``i`` by ``alpha + beta * i / (num_blocks - 1)`` and every other key by
    ``alpha``; for merging (L117-126) ``beta`` is the searched coefficient and
    ``alpha = (|sum_t tau_t|_1 / |tau_MTL|_1) / K`` over the whole model (``src/eval/aggregation.py``
    L175-178), i.e. ``1 / K`` for task arithmetic (the first block is the experts' average); the
    result is applied at coefficient 1 (L126). ``tau_MTL``: the sum (``config/method/sum.yaml``,
    ``k: 100``, nothing trimmed) or TIES with ``k: 20``, ``agg: mean`` (``config/method/ties.yaml``;
    ``aggregation.py`` L113-116). ``beta`` is picked on validation from ``linspace(0, 1, 11)[1:]``
    for task arithmetic, ``arange(0.1, 1.6, 0.1)`` for TIES (``eval.py`` L212-215, ``n_eval_points:
    21`` in ``config/config.yaml``); no fixed default exists, ours is the middle of the first grid.

    Args:
        task_vectors, base: as every static merge.
        scaling: LiNeS's ``beta``, the factor added from the first block to the last (>= 0; default
            0.5; picked on a labeled split when tuned).
        alpha: the factor of the first block and of the parameters outside the blocks (>= 0);
            ``None`` (default): the official rule above. ``alpha = 0`` leaves the first block at the
            base and makes the last block task arithmetic at ``scaling``.
        merge: the multi-task vector, ``sum`` (default: task arithmetic's) or ``ties``.
        keep: TIES's kept fraction of each task vector when ``merge="ties"`` (default 0.2, the
            official ``k: 20``), in (0, 1].
        blocks: the blocks' qualified names in order (``None``: read off the parameter names,
            :func:`block_depths`).
    """
    if merge not in _MERGES:
        raise ValueError(f"lines: merge must be one of {_MERGES}, got {merge!r}")
    if scaling < 0:
        raise ValueError(f"lines: scaling must be >= 0, got {scaling}")
    if alpha is not None and alpha < 0:
        raise ValueError(f"lines: alpha must be >= 0 or None, got {alpha}")
    multitask = _multitask_vectors(task_vectors, merge, keep)
    if alpha is None:
        summed = sum(float(tau.float().sum(0).abs().sum()) for tau in task_vectors.tensors)
        mass = sum(float(m.abs().sum()) for m in multitask)
        alpha = summed / mass / task_vectors.num_tasks if mass > 0 else 1.0 / task_vectors.num_tasks
    depth = block_depths(task_vectors.names, blocks)
    out = {}
    for name, m in zip(task_vectors.names, multitask):
        factor = alpha + scaling * depth[name] if name in depth else alpha
        b = base[name]
        out[name] = (b.float() + factor * m.to(b.device)).to(b.dtype)
    return out
