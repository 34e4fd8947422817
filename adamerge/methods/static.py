"""Static merges and the TIES transform, one small function each.

Every merge method shares one signature::

    method(task_vectors: TaskVectors, base: Mapping[str, Tensor], **hparams) -> dict[str, Tensor]

and returns the merged tensors of the merged parameters (the others keep the base value).
Each is registered by name in :data:`adamerge.methods.registry.REGISTRY`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..engine.task_vectors import TaskVectors

MergeMethod = Callable[..., dict[str, torch.Tensor]]


def _combine(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor],
             per_task: torch.Tensor) -> dict[str, torch.Tensor]:
    """``base + sum_k per_task[k] * tau_k`` for every merged parameter."""
    out = {}
    for name, tau in zip(task_vectors.names, task_vectors.tensors):
        b = base[name]
        w = per_task.to(device=tau.device, dtype=torch.float32)
        out[name] = (b.float() + torch.tensordot(w, tau.float(), dims=1)).to(b.dtype)
    return out


def weight_averaging(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of the fine-tuned models (``base + mean_k tau_k``)."""
    k = task_vectors.num_tasks
    return _combine(task_vectors, base, torch.full((k,), 1.0 / k))


def task_arithmetic(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor],
                    scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``base + scaling * sum_k tau_k``."""
    return _combine(task_vectors, base, torch.full((task_vectors.num_tasks,), float(scaling)))


def _topk_masks(task_vectors: TaskVectors, keep: float) -> list[torch.Tensor]:
    """Per parameter, a ``[K, *shape]`` bool mask of entries in the top ``keep`` fraction of
    magnitudes of their task's whole flattened task vector."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    k_count = task_vectors.num_tasks
    thresholds = []
    for k in range(k_count):
        mags = torch.cat([t[k].reshape(-1).abs().float() for t in task_vectors.tensors])
        drop = int(mags.numel() * (1.0 - keep))
        # kthvalue is 1-based: the drop-th smallest magnitude is the largest one removed
        thresholds.append(mags.kthvalue(drop).values if drop > 0 else mags.new_tensor(-1.0))
        del mags
    thr = torch.stack(thresholds)
    return [t.abs().float() > thr.view(-1, *([1] * (t.dim() - 1))).to(t.device) for t in task_vectors.tensors]


def ties_task_vectors(task_vectors: TaskVectors, keep: float = 0.2) -> TaskVectors:
    """TIES trim / elect / disjoint-select applied to each task vector (AdaMerging++).

    Each task vector keeps its ``keep`` fraction of largest magnitudes; a sign is elected per
    entry from the sum of the trimmed vectors; entries whose sign disagrees are dropped. The
    result is K task vectors again (not merged), whose coefficients can then be learned.
    """
    masks = _topk_masks(task_vectors, keep)
    tensors = []
    for tau, mask in zip(task_vectors.tensors, masks):
        trimmed = torch.where(mask, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
        sign = torch.sign(trimmed.float().sum(0))
        agree = torch.sign(trimmed.float()) == sign
        tensors.append(torch.where(agree & mask, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)))
    meta = {**task_vectors.meta, "transform": f"ties(keep={keep})"}
    return TaskVectors(list(task_vectors.task_names), list(task_vectors.names), tensors, meta)


def ties(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], keep: float = 0.2,
         scaling: float = 1.0, merge: str = "mean") -> dict[str, torch.Tensor]:
    """TIES-merging: trim, elect signs, disjoint merge of the agreeing entries, times ``scaling``.

    ``merge``: ``mean`` (the TIES paper's, our default, with ``scaling`` picked on a labeled
    split) or ``sum`` (the disjoint sum of the official AdaMerging baseline,
    ``src/main_ties_merging.py`` L53-57: ``merge_func = "dis-sum"`` at a fixed 0.3).
    """
    if merge not in ("mean", "sum"):
        raise ValueError(f"ties: merge must be 'mean' or 'sum', got {merge!r}")
    selected = ties_task_vectors(task_vectors, keep)
    out = {}
    for name, tau in zip(selected.names, selected.tensors):
        merged = tau.float().sum(0)
        if merge == "mean":
            merged = merged / (tau != 0).sum(0).clamp(min=1)
        out[name] = (base[name].float() + scaling * merged).to(base[name].dtype)
    return out
