"""Model Stock: per parameter tensor, the mean of the fine-tuned models pulled towards the
pretrained one by a ratio read off the angle between their task vectors (no data, no tuning).

A static merge (``f(task_vectors, base, **hparams) -> {name: merged tensor}``, as in
:mod:`adamerge.methods.static`).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..engine.task_vectors import TaskVectors

# fusion_bench/method/model_stock/model_stock.py L23: added to the cosine's and the ratio's denominators
EPS = 1e-8
_AVERAGES = ("angle", "cosine")


def mean_pairwise_cosine(tau: torch.Tensor, average: str = "angle") -> float:
    """The cosine that sets one tensor's ratio: over every pair ``i < j`` of the K task vectors
    (``tau``: ``[K, *shape]``) the cosine ``<tau_i, tau_j> / (|tau_i| |tau_j| + EPS)`` clamped to
    [-1, 1]; ``average="angle"`` returns the cosine of the mean of their angles (FusionBench),
    ``"cosine"`` the mean of the cosines (mergekit). Computed in float64."""
    flat = tau.reshape(tau.shape[0], -1).double()
    gram = flat @ flat.T
    norms = gram.diagonal().clamp(min=0).sqrt()
    cos = (gram / (norms[:, None] * norms[None, :] + EPS)).clamp(-1.0, 1.0)
    i, j = torch.triu_indices(len(norms), len(norms), offset=1)
    pairs = cos[i, j]
    if average == "cosine":
        return float(pairs.mean())
    return math.cos(float(torch.acos(pairs).mean()))


def stock_ratio(cos: float, k: int) -> float:
    """Model Stock's interpolation ratio ``t = k cos / ((k - 1) cos + 1 + EPS)`` for ``k`` models."""
    return k * cos / ((k - 1) * cos + 1 + EPS)


def model_stock(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor],
                average: str = "angle") -> dict[str, torch.Tensor]:
    """Model Stock: per parameter tensor ``base + t * mean_k tau_k``, ``t`` from the angle
    between the fine-tuned models' task vectors.

    Follows tanganke/fusion_bench (commit 54c9e8c) ``fusion_bench/method/model_stock/model_stock.py``:
    per state-dict tensor the angle between each pair of task vectors (``compute_angle``, L26-87:
    cosine with ``EPS`` in the denominator, clamped to [-1, 1], L73-78), averaged over the pairs
    (L212-237; with two models the one angle, L200-208), the ratio
    ``t = k cos(angle) / ((k - 1) cos(angle) + 1 + EPS)`` (``compute_ratio``, L90-105), and
    ``w = t * mean(w_k) + (1 - t) * w_0`` (L255-270), i.e. ``w_0 + t * mean_k tau_k``. Its ignored
    keys (``config/method/model_stock/model_stock.yaml`` L5-13: the text tower of an open_clip
    checkpoint) are not in our pools. naver-ai/model-stock (commit e4d75af) holds a README only.
    mergekit (commit a6e4028, ``merge_methods/model_stock.py`` L67-82) averages the *cosines* of the
    pairs instead: ``average="cosine"``. With K = 2 both are the paper's rule.

    Args:
        task_vectors, base: as every static merge (at least two task vectors).
        average: ``angle`` (default, FusionBench) or ``cosine`` (mergekit).
    """
    if average not in _AVERAGES:
        raise ValueError(f"model_stock: average must be one of {_AVERAGES}, got {average!r}")
    k = task_vectors.num_tasks
    if k < 2:
        raise ValueError(f"model_stock: needs at least 2 task vectors, got {k}")
    out = {}
    for name, tau in zip(task_vectors.names, task_vectors.tensors):
        t = stock_ratio(mean_pairwise_cosine(tau, average), k)
        b = base[name]
        out[name] = (b.float() + t * tau.float().mean(0).to(b.device)).to(b.dtype)
    return out
