"""Merges ruled by the magnitudes of the task-vector entries: MagMax, DELLA and PCB-merging.

All three are static merges (``f(task_vectors, base, **hparams) -> {name: merged tensor}``, as
in :mod:`adamerge.methods.static`); DELLA's drop-and-rescale step is also a transform
(:func:`della_task_vectors`, K task vectors back, as DARE's in :mod:`adamerge.methods.sparsify`).
Each docstring names the official code it follows (repository, commit, file and line); where the
official code divides by zero (a constant row or task vector) we give the value stated in the
docstring instead of a NaN.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..engine.task_vectors import TaskVectors
from .sparsify import _dense, _with_transform, _zero

# ------------------------------------------------------------------------------------- MagMax


def magmax(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor],
           scaling: float = 0.5) -> dict[str, torch.Tensor]:
    """MagMax: per entry the task-vector value of largest magnitude, ``base + scaling * tau_max``.

    Follows danielm1405/magmax (commit 4f49f18) ``src/merging/task_vectors.py`` ``merge_max_abs``
    (L104-127): the task vectors are folded in task order and a later one replaces the running
    value where ``|tau_t| >= |running|`` (L122), so on equal magnitudes the *last* task wins. The
    selected vector is applied with ``scaling_coef = 0.5`` for independently fine-tuned models
    (``merge_8datasets.py`` L25; the commented search at L22 is ``linspace(0, 1, 21)[1:]``, our
    ``tune`` grid). FusionBench has the same rule and default (tanganke/fusion_bench @54c9e8c
    ``fusion_bench/method/magmax/magmax.py`` L85, L149; ``config/method/magmax/magmax.yaml`` L16).

    Args:
        task_vectors, base: as every static merge.
        scaling: coefficient of the selected vector (default 0.5), in [0, inf).
    """
    if scaling < 0:
        raise ValueError(f"magmax: scaling must be >= 0, got {scaling}")
    out = {}
    for name, tau in zip(task_vectors.names, task_vectors.tensors):
        chosen = tau[0].float()
        for k in range(1, tau.shape[0]):
            current = tau[k].float()
            chosen = torch.where(current.abs() >= chosen.abs(), current, chosen)  # ``>=``: later task wins ties
        b = base[name]
        out[name] = (b.float() + scaling * chosen.to(b.device)).to(b.dtype)
    return out


# -------------------------------------------------------------------------------------- DELLA

_DELLA_RESCALE = ("l1", "probability", "none")
_RESCALE_EPS = 1e-7  # mergekit sparsify.py L27: below this L1 mass, no rescaling


def _rank_fraction(magnitudes: torch.Tensor) -> torch.Tensor:
    """Each entry's rank by magnitude within its row, scaled to [0, 1] (smallest 0, largest 1).

    ``magnitudes`` is ``[K, *shape]``: the rows run along dimension 1 of each task's tensor (so
    dimension 2 here) as mergekit ranks them (``argsort(dim=1)`` after ``unsqueeze(0)`` of a 1-D
    tensor: a vector is one row). Equal magnitudes are ranked in index order (stable sort). A row
    of one entry has no spread (mergekit divides 0 by 0): it gets 0.5, the middle of the range.
    """
    if magnitudes.dim() <= 2:  # 0-d or 1-D parameters: one row per task
        rows = magnitudes.reshape(magnitudes.shape[0], 1, -1)
        return _rank_fraction(rows).reshape(magnitudes.shape)
    n = magnitudes.shape[2]
    if n == 1:
        return torch.full_like(magnitudes, 0.5)
    order = torch.argsort(magnitudes, dim=2, stable=True)
    ranks = torch.argsort(order, dim=2, stable=True).to(magnitudes.dtype)  # 0 .. n-1
    return ranks / (n - 1)


def _rescale(tau: torch.Tensor, kept: torch.Tensor, probs: torch.Tensor, rescale: str) -> torch.Tensor:
    """The kept entries of each task (``tau`` and ``kept``: ``[K, *shape]``) rescaled by ``rescale``."""
    masked = torch.where(kept, tau, _zero(tau))
    if rescale == "none":
        return masked
    if rescale == "probability":  # the DELLA code: each survivor divided by its own keep probability
        return masked / probs
    # mergekit: the whole tensor's L1 mass restored per task; no rescaling below _RESCALE_EPS
    before = tau.abs().reshape(tau.shape[0], -1).sum(1)
    after = masked.abs().reshape(tau.shape[0], -1).sum(1)
    ok = (before >= _RESCALE_EPS) & (after >= _RESCALE_EPS)
    factor = torch.where(ok, before / after.clamp(min=_RESCALE_EPS), torch.ones_like(before))
    return masked * factor.view(-1, *([1] * (tau.dim() - 1)))


def _check_della(density: float, epsilon: float, rescale: str) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"della: density must be in (0, 1], got {density}")
    if epsilon < 0:
        raise ValueError(f"della: epsilon must be >= 0, got {epsilon}")
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise ValueError(f"della: epsilon must keep density +/- epsilon in (0, 1), got density {density}, "
                         f"epsilon {epsilon}")
    if rescale not in _DELLA_RESCALE:
        raise ValueError(f"della: rescale must be one of {_DELLA_RESCALE}, got {rescale!r}")


def della_task_vectors(task_vectors: TaskVectors, density: float = 0.7, epsilon: float = 0.15,
                       seed: int = 0, rescale: str = "l1") -> TaskVectors:
    """DELLA's MagPrune: drop each entry with a probability ruled by its magnitude rank in its
    row, then rescale the survivors.

    Follows arcee-ai/mergekit (commit a6e4028) ``mergekit/sparsify.py`` ``della_magprune``
    (L138-175): per row (dimension 1 of each task's tensor; a vector is one row, L161-162) the
    magnitudes are ranked (L163-166), the ranks min-max normalised (L168-170) and mapped to keep
    probabilities from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest, L171);
    one Bernoulli draw per entry (L172), then the L1 mass of each task's whole tensor is restored
    (``rescaled_masked_tensor``, L23-53, ``rescale`` on by default for ``della``:
    ``merge_methods/registry.py`` L83-91). ``density >= 1`` leaves the vectors as they are (L144).

    Deterministic: one CPU ``torch.Generator`` seeded with ``seed`` draws ``u ~ U[0, 1)`` for every
    entry, parameter by parameter in ``task_vectors.names`` order (the K tasks of a parameter in one
    draw); an entry is kept where ``u < p``, a Bernoulli(p) draw. mergekit draws from torch's global
    generator, so its masks are not reproducible run to run.

    Args:
        task_vectors: the K task vectors (not modified).
        density: mean keep probability, in (0, 1] (default 0.7: the DELLA README's example
            ``--drop_rate 0.3``, declare-lab/della @8067515 ``README.md`` L46; mergekit's own default 1.0
            prunes nothing).
        epsilon: half-width of the keep probabilities, ``density +/- epsilon`` in (0, 1) (default
            0.15, mergekit ``merge_methods/generalized_task_arithmetic.py`` L72-78).
        seed: seed of the draws (default 0).
        rescale: ``l1`` (mergekit: each task tensor's L1 mass restored), ``probability`` (the DELLA
            code, declare-lab/della ``mergekit/mergekit/sparsify.py`` L127-130: each survivor divided by
            its keep probability) or ``none``.

    Returns:
        K task vectors, ``meta["transform"] = "della(density=..,epsilon=..,seed=..,rescale=..)"``.
    """
    _check_della(density, epsilon, rescale)
    label = f"della(density={density},epsilon={epsilon},seed={seed},rescale={rescale})"
    if density >= 1.0:
        return _with_transform(task_vectors, [t.clone() for t in task_vectors.tensors], label)
    gen = torch.Generator().manual_seed(int(seed))
    tensors = []
    for tau in task_vectors.tensors:
        t = tau.float()
        probs = (density - epsilon) + _rank_fraction(t.abs()) * (2.0 * epsilon)
        kept = torch.rand(t.shape, generator=gen).to(t.device) < probs
        tensors.append(_rescale(t, kept, probs, rescale).to(tau.dtype))
        del t, probs, kept
    return _with_transform(task_vectors, tensors, label)


def della(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], density: float = 0.7,
          epsilon: float = 0.15, scaling: float = 1.0, seed: int = 0,
          rescale: str = "l1") -> dict[str, torch.Tensor]:
    """DELLA-merging: MagPrune (:func:`della_task_vectors`), elect a sign per entry, average the
    agreeing survivors, ``base + scaling * merged``.

    Follows mergekit's ``della`` (commit a6e4028, ``merge_methods/registry.py`` L83-91: TIES sign
    consensus by ``sum``, ``normalize`` and ``rescale`` on) in
    ``merge_methods/generalized_task_arithmetic.py`` ``GTATask.execute`` with every model's
    ``weight`` 1: the elected sign is ``+1`` where the sum of the pruned vectors is ``>= 0``, else
    ``-1`` (``get_mask``, L243-254; a dropped entry has sign 0 and agrees with neither), the merged
    entry is the sum of the agreeing entries over their count (L170-179; count 0 -> divisor 1),
    times ``lambda`` (L181-182, default 1.0, L57; the DELLA README's example 1.1, L50).

    Args:
        task_vectors, base: as every static merge.
        density, epsilon, seed, rescale: as :func:`della_task_vectors` (defaults 0.7, 0.15, 0, ``l1``).
        scaling: mergekit's ``lambda`` (default 1.0; picked on a labeled split when tuned).
    """
    pruned = della_task_vectors(task_vectors, density, epsilon, seed, rescale)
    out = {}
    for name, tau in zip(pruned.names, pruned.tensors):
        t = tau.float()
        elected = torch.where(t.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(t) == elected
        total = torch.where(agree, t, _zero(t)).sum(0)
        count = agree.sum(0).clamp(min=1)
        b = base[name]
        out[name] = (b.float() + scaling * (total / count).to(b.device)).to(b.dtype)
    return out


# ---------------------------------------------------------------------------------------- PCB


def _sorted_values(tensors: list[torch.Tensor], k: int, indices: tuple[int, int],
                   transform: Callable[[torch.Tensor], torch.Tensor] = torch.abs) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorted(task k's flat vector)[i]`` for the two ``indices`` (ascending, 0-based), over every
    parameter's ``transform(tensors[p][k])``: one task's whole flattened vector, as the official
    code holds it (one task at a time in memory)."""
    flat = torch.cat([transform(t[k]).reshape(-1).float().cpu() for t in tensors])
    return flat.kthvalue(indices[0] + 1).values, flat.kthvalue(indices[1] + 1).values


def _bcast(per_task: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[K]`` tensor shaped to broadcast against ``like`` (``[K, *shape]``)."""
    return per_task.view(-1, *([1] * (like.dim() - 1))).to(like.device)


def _clamp_per_task(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``x`` (``[K, *shape]``) clamped to ``[low[k], high[k]]`` per task."""
    return torch.minimum(torch.maximum(x, _bcast(low, x)), _bcast(high, x))


def _unit_range(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(clamp(x, low, high) - low) / (high - low)`` per task (``low``, ``high``: ``[K]``);
    0 where ``high == low`` (the official ``normalize`` divides by zero there)."""
    span = _bcast(high - low, x)
    scaled = (_clamp_per_task(x, low, high) - _bcast(low, x)) / span.clamp(min=torch.finfo(x.dtype).tiny)
    return torch.where(span > 0, scaled, _zero(x))


def _pcb_check(ratio: float, clip: float, scaling: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"pcb: ratio must be in (0, 1], got {ratio}")
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"pcb: clip must be in [0, 0.5), got {clip}")
    if scaling < 0:
        raise ValueError(f"pcb: scaling must be >= 0, got {scaling}")


def pcb(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], ratio: float = 0.05,
        scaling: float = 1.2, clip: float = 0.01) -> dict[str, torch.Tensor]:
    """PCB-merging (Parameter Competition Balancing): each entry of each task vector gets a score
    from its own task (intra-balancing) and from the other tasks (inter-balancing); each task keeps
    its top ``ratio`` of scores, rescaled to [0, 1], as weights of a weighted mean of the task
    vectors, times ``scaling``.

    Follows duguodong7/pcb-merging (commit 5897888) ``vision_source_code/pcb.py`` L44-105, the
    script of its CLIP ViT results. Every statistic is over one task's *whole* flattened task
    vector (all parameters; ``n, d = all_checks.shape``, L82), as there:

    * clip: ``|tau_t|`` clamped between its ``int(d * clip)``-th and ``int(d * (1 - clip) - 1)``-th
      sorted values (``clamp``, L62-74; ``clip = 0.01`` at L83); ``c_t = sign(tau_t) * clamped``;
    * intra: ``exp(K * u_t^2)``, ``u_t`` the clamped magnitudes min-max normalised per task (L86-88);
    * inter: ``tanh(tau_t * sum_s sign(tau_s) u_s)`` (L86, L89-90; ``act`` is tanh, L76-78);
    * weights: ``intra * inter`` clamped below at its ``int(d * (1 - ratio))``-th sorted value and
      min-max normalised per task, so each task's top ``ratio`` entries get weights in (0, 1] and
      the rest 0 (L101; ``att_ratio = 0.05``, L85);
    * merge: ``sum_t lambda_t c_t w_t / max(sum_t w_t, 1e-12)`` with every ``lambda_t = 1.2``
      (L103-105), applied to the pretrained weights as is (L32).

    The repository's other versions differ: ``pcb-merging.py`` L31-45 (``PCB_merge``, default
    ``pcb_ratio = 0.1``, clip ``0.0001``, inter-balancing on the raw sum ``tau_t * sum_s tau_s``);
    ``nlp_source_code/utils/merge_utils.py`` L434-448 (clip 0.01, raw sum). Its evolutionary search
    (``pcb-merging.py`` L64) looks for per-task lambdas in [0.8, 1.3] on validation data: our
    ``tune`` grid of one common ``scaling``.

    Memory: the scores are kept as one float32 copy of the task vectors until the thresholds
    (one flat per task at a time) are known.

    Args:
        task_vectors, base: as every static merge.
        ratio: fraction of each task's entries that get a weight, in (0, 1] (default 0.05).
        scaling: the common lambda (default 1.2).
        clip: fraction of each task's magnitudes clamped at either end, in [0, 0.5) (default 0.01).
    """
    _pcb_check(ratio, clip, scaling)
    taus = [t.float() for t in _dense(task_vectors).tensors]
    k_count = task_vectors.num_tasks
    d = sum(t[0].numel() for t in taus)
    bounds = [_sorted_values(taus, k, (int(d * clip), int(d * (1 - clip) - 1))) for k in range(k_count)]
    low, high = (torch.stack(b) for b in zip(*bounds))
    scores = []
    for tau in taus:
        unit = _unit_range(tau.abs(), low, high)  # u_t: the clamped magnitudes in [0, 1]
        inter = torch.tanh(tau * (torch.sign(tau) * unit).sum(0))
        scores.append(torch.exp(k_count * unit ** 2) * inter)
        del unit, inter
    keep = [_sorted_values(scores, k, (int(d * (1 - ratio)), d - 1), lambda t: t) for k in range(k_count)]
    score_low, score_high = (torch.stack(b) for b in zip(*keep))
    out = {}
    for name, tau, score in zip(task_vectors.names, taus, scores):
        clamped = torch.sign(tau) * _clamp_per_task(tau.abs(), low, high)
        weight = _unit_range(score, score_low, score_high)
        merged = scaling * (clamped * weight).sum(0) / weight.sum(0).clamp(min=1e-12)
        b = base[name]
        out[name] = (b.float() + merged.to(b.device)).to(b.dtype)
    return out

