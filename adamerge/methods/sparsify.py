"""Sparsifying merges: DARE, Breadcrumbs, TALL masks, Consensus merging and EMR-merging.

Three shapes of function, as in :mod:`adamerge.methods.static`:

* *transforms* ``f(task_vectors, **hparams) -> TaskVectors`` return K sparsified task vectors
  (not merged) and record what was done in ``meta["transform"]``: :func:`dare_task_vectors`,
  :func:`breadcrumbs_task_vectors`, :func:`consensus_task_vectors`,
  :func:`magnitude_prune_task_vectors` (E-WEMoE's sparse MLP task vectors);
* *static merges* ``f(task_vectors, base, **hparams) -> {name: merged tensor}`` are task
  arithmetic (``base + scaling * sum_k tau_k``) over a transform: :func:`dare`,
  :func:`breadcrumbs`, :func:`consensus`;
* *per-task builders* ``f(loaded, **hparams) -> {task: () -> state dict}`` give one model per
  task, built when its callable is called (one task's state in memory at a time):
  :func:`tall_masks`, :func:`emr`.

Each function's docstring names the official code it follows (repository, file and line numbers
of the commit read, given at the head of each docstring). Entries whose rules differ between the
paper and the code follow the code and say so.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from ..engine.task_vectors import TaskVectors
from ..io.checkpoints import StateDict
from ..models.pool import LoadedPool
from .static import task_arithmetic

Lambdas = float | Mapping[str, float]


def _with_transform(task_vectors: TaskVectors, tensors: list[torch.Tensor], label: str) -> TaskVectors:
    """New task vectors with ``tensors``; ``meta["transform"]`` gets ``label`` (appended with ``+``
    to an earlier transform, so a resumed run on differently transformed vectors is refused)."""
    before = task_vectors.meta.get("transform")
    meta = {**task_vectors.meta, "transform": f"{before}+{label}" if before else label}
    return TaskVectors(list(task_vectors.task_names), list(task_vectors.names), tensors, meta)


def _zero(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _dense(task_vectors: TaskVectors) -> TaskVectors:
    """Dense task vectors (LoRA pools hold factors; these methods need every entry)."""
    return task_vectors.to_dense() if hasattr(task_vectors, "to_dense") else task_vectors


# --------------------------------------------------------------------------------------- DARE


def dare_task_vectors(task_vectors: TaskVectors, p: float = 0.5, seed: int = 0) -> TaskVectors:
    """DARE (Drop And REscale) each task vector: drop every entry with probability ``p``, divide
    the kept entries by ``1 - p``.

    Follows yule-BUAA/MergeLM (commit 6d49ad9) ``model_merging_methods/mask_weights_utils.py``:
    the drop mask is an independent Bernoulli(``p``) draw per entry of the *delta* weights
    (L19-21, with ``weight_format="delta_weight"`` at L58-60), applied to each fine-tuned model's
    task vector separately (``merging_methods.py`` L577-581); the survivors are divided by
    ``1 - p`` unless ``p == 1`` (L33-34, then everything is dropped). Every merged parameter
    (every floating tensor of the pool) is dropped, as there (no parameter excluded by default).

    Deterministic: one CPU ``torch.Generator`` seeded with ``seed`` draws the masks parameter by
    parameter in ``task_vectors.names`` order (all K tasks of a parameter in one draw), so the same
    seed and pool give the same vectors on every call and device.

    Args:
        task_vectors: the K task vectors (not modified).
        p: drop probability in [0, 1] (default 0.5; MergeLM's command-line default is 0.1 and its
            paper sweeps 0.1-0.9; 0.5 is a middle value for vision task vectors).
        seed: seed of the drop masks (default 0).

    Returns:
        K task vectors of the same dtypes, ``meta["transform"] = "dare(p=..,seed=..)"``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"DARE drop probability p must be in [0, 1], got {p}")
    gen = torch.Generator().manual_seed(int(seed))
    scale = 1.0 / (1.0 - p) if p < 1.0 else 1.0
    tensors = []
    for tau in task_vectors.tensors:
        drop = torch.bernoulli(torch.full(tau.shape, float(p)), generator=gen).to(tau.device).bool()
        kept = tau.float() * scale
        tensors.append(torch.where(drop, _zero(kept), kept).to(tau.dtype))
        del drop, kept
    return _with_transform(task_vectors, tensors, f"dare(p={p},seed={seed})")


def dare(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], p: float = 0.5,
         scaling: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE + task arithmetic: ``base + scaling * sum_k dare(tau_k)``.

    MergeLM applies DARE to each model and then the chosen merge (``mask_apply_method``,
    ``merging_methods.py`` L571-587); with ``"task_arithmetic"`` that is
    ``pretrained + scaling * sum`` (L57-78 and ``task_vector.py`` L50-62). Its GLUE script searches
    ``scaling`` in {0.1, 0.3, 0.5, 0.7, 0.9, 1.0} (``merge_plms_glue.py`` L219).

    Args:
        task_vectors, base: as every static merge (see :mod:`adamerge.methods.static`).
        p, seed: as :func:`dare_task_vectors` (defaults 0.5, 0).
        scaling: task-arithmetic coefficient (default 0.3; picked on a labeled split when tuned).
    """
    return task_arithmetic(dare_task_vectors(task_vectors, p, seed), base, scaling)


# --------------------------------------------------------------------------------- Breadcrumbs


def _fraction_count(n: int, fraction: float) -> int:
    """``int(n * fraction)``: the rounding of the official code (truncation of the float product)."""
    return int(n * fraction)


def breadcrumbs_task_vectors(task_vectors: TaskVectors, keep: float = 0.15,
                             top: float = 0.006) -> TaskVectors:
    """Model Breadcrumbs: in each row of each task vector, drop the ``top`` fraction of largest
    magnitudes (outliers), then keep the next ``keep`` fraction of largest magnitudes; the rest is 0.

    Follows rezazzr/breadcrumbs (commit f89fc66) ``src/task_vectors.py`` ``TaskVectorMiddleKeep``
    (L155-195):

    * per row: both steps take ``topk`` of ``|tau|`` along the *last* dimension of each tensor
      (L180, L191; ``scatter_`` on dim ``len(shape) - 1`` at L182, L193), so a 2-D weight is
      masked row by row, a 1-D tensor (bias, LayerNorm) as one row, and a 0-d tensor is left as
      it is (L176-177, L187-188). Higher-dimensional tensors (convolutions) are masked along
      their last dimension too, as there;
    * counts: ``int(row_length * top)`` removed (L190) and ``int(row_length * keep)`` kept
      (L179), both fractions of the full row length;
    * order: removal first (``remove_first=True``, L163, L170-171), so the kept entries are the
      ranks ``[n_top, n_top + n_keep)`` of the row by magnitude. Ties between equal magnitudes are
      broken by ``torch.topk`` as there;
    * every floating tensor is masked (no parameter excluded, L34-37); each task separately.

    Defaults ``keep=0.15`` (their ``beta``), ``top=0.006`` (their ``gamma``): the starting point
    of their hyper-parameter search, ``find_best_hyperparam.py`` L237-243 (their README example
    uses 0.2 / 0.1).

    Args:
        task_vectors: the K task vectors (not modified).
        keep: fraction of each row kept after the removal, in [0, 1].
        top: fraction of each row's largest magnitudes removed, in [0, 1].

    Returns:
        K task vectors, ``meta["transform"] = "breadcrumbs(keep=..,top=..)"``.
    """
    for label, value in (("keep", keep), ("top", top)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Breadcrumbs {label} must be in [0, 1], got {value}")
    tensors = []
    for tau in task_vectors.tensors:
        if tau.dim() == 1:  # a 0-d parameter stacked over tasks: left as it is
            tensors.append(tau.clone())
            continue
        n = tau.shape[-1]
        n_top, n_keep = _fraction_count(n, top), _fraction_count(n, keep)
        mags = tau.abs().float()
        removed = torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
        if n_top > 0:
            removed.scatter_(-1, mags.topk(n_top, dim=-1).indices, True)
            mags.masked_fill_(removed, -1.0)  # below every kept magnitude
        kept = torch.zeros_like(removed)
        if n_keep > 0:
            kept.scatter_(-1, mags.topk(min(n_keep, n), dim=-1).indices, True)
        kept &= ~removed
        tensors.append(torch.where(kept, tau, _zero(tau)))
        del mags, removed, kept
    return _with_transform(task_vectors, tensors, f"breadcrumbs(keep={keep},top={top})")


def breadcrumbs(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], keep: float = 0.15,
                top: float = 0.006, scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Model Breadcrumbs merge: ``base + scaling * sum_k breadcrumbs(tau_k)``.

    The official merge sums the masked task vectors and applies them with one coefficient
    (rezazzr/breadcrumbs ``merging_trend_eval.py`` L139-148, L180-181; ``apply_to`` in
    ``src/task_vectors.py`` L63-75); its search draws that coefficient from U(0.01, 1)
    (``find_best_hyperparam.py`` L239).

    Args:
        task_vectors, base: as every static merge.
        keep, top: as :func:`breadcrumbs_task_vectors` (defaults 0.15, 0.006).
        scaling: task-arithmetic coefficient (default 0.3; picked on a labeled split when tuned).
    """
    return task_arithmetic(breadcrumbs_task_vectors(task_vectors, keep, top), base, scaling)


# ---------------------------------------------------------------------- magnitude pruning


# torch.quantile refuses inputs of more than 2^24 entries; past that its rule is applied by hand
_QUANTILE_NUMEL = 1 << 24


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation), also for tensors past its 2^24-entry
    limit: two ``kthvalue`` calls and torch's own arithmetic (``q`` rounded to ``values``' dtype,
    the rank ``q * (n - 1)`` in double, the ``lerp`` weight in ``values``' dtype)."""
    flat = values.reshape(-1)
    if flat.numel() <= _QUANTILE_NUMEL:
        return torch.quantile(flat, q)
    rank = float(torch.tensor(q, dtype=flat.dtype)) * (flat.numel() - 1)
    lo, hi = math.floor(rank), min(math.ceil(rank), flat.numel() - 1)
    below, above = flat.kthvalue(lo + 1).values, flat.kthvalue(hi + 1).values
    return torch.lerp(below, above, torch.tensor(rank - lo, dtype=flat.dtype))


def magnitude_prune_task_vectors(task_vectors: TaskVectors, ratio: float = 0.9,
                                 parameters: list[str] | None = None) -> TaskVectors:
    """Magnitude pruning of each task vector, tensor by tensor: in task ``k``'s tensor of each
    parameter, the entries whose magnitude is above the ``ratio`` quantile of that tensor's
    magnitudes are kept, the rest set to 0; nothing is rescaled.

    Follows tanganke/fusion_bench (commit 54c9e8c) ``fusion_bench/models/sparse_we_moe.py``
    (E-WEMoE): ``_magnitude_prune`` (L97-111) keeps ``|w| > |w|.quantile(prune_ratio)`` (strict
    ``>``, ``torch.quantile``'s linear interpolation, no rescaling) of one tensor;
    ``_module_magnitude_prune`` (L114-126) applies it to every parameter of each expert's MLP
    task vector separately (L186-190): per task, per tensor, biases included. With distinct
    magnitudes a tensor of ``n`` entries keeps its ``n - 1 - floor(ratio * (n - 1))`` largest.

    ``ratio == 0`` keeps every entry (the identity): FusionBench's strict ``>`` against the
    0-quantile (the minimum) would still drop each tensor's smallest-magnitude entries.

    Args:
        task_vectors: the K task vectors (not modified; tensors not pruned are shared).
        ratio: fraction of each tensor pruned, in [0, 1] (FusionBench ``tv_prune_ratio``, 0.9 in
            ``config/method/wemoe/sparse_weight_ensembling_moe.yaml`` L12).
        parameters: the parameters pruned (default every one); E-WEMoE prunes the routed MLPs'.

    Returns:
        K task vectors, ``meta["transform"] = "magnitude_prune(ratio=..,tensors=..)"``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"magnitude pruning ratio must be in [0, 1], got {ratio}")
    tv = _dense(task_vectors)
    chosen = set(tv.names if parameters is None else parameters)
    unknown = sorted(chosen - set(tv.names))
    if unknown:
        raise ValueError(f"magnitude pruning: parameters {unknown[:3]} have no task vector")
    if ratio == 0.0:
        return tv
    tensors = []
    for name, tau in zip(tv.names, tv.tensors):
        if name not in chosen:
            tensors.append(tau)
            continue
        out = torch.empty_like(tau)
        for k in range(tau.shape[0]):
            mags = tau[k].abs().float()
            out[k] = torch.where(mags > _quantile(mags, ratio), tau[k], _zero(tau))
        tensors.append(out)
    return _with_transform(tv, tensors, f"magnitude_prune(ratio={ratio},tensors={len(chosen)})")


# ----------------------------------------------------------------------- TALL masks, Consensus


def _lambda_vector(task_vectors: TaskVectors, lambdas: Lambdas) -> torch.Tensor:
    """``[K]`` float tensor of per-task lambdas from one float or a task -> float mapping."""
    tasks = task_vectors.task_names
    if isinstance(lambdas, Mapping):
        missing = [t for t in tasks if t not in lambdas]
        extra = [t for t in lambdas if t not in tasks]
        if missing or extra:
            raise ValueError(f"TALL-mask lambdas must give one value per task {tasks}; "
                             f"missing {missing}, unknown {extra}")
        values = [float(lambdas[t]) for t in tasks]
    else:
        values = [float(lambdas)] * len(tasks)
    if any(v < 0 for v in values):
        raise ValueError(f"TALL-mask lambdas must be >= 0, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def _tall_mask(tau: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """TALL masks of one parameter: ``tau`` is ``[K, *shape]``, ``lam`` is ``[K]``."""
    tau = tau.float()
    total = tau.sum(0)
    lam = lam.to(tau.device).view(-1, *([1] * (tau.dim() - 1)))
    return tau.abs() > (total - tau).abs() * lam


def tall_mask_tensors(task_vectors: TaskVectors, lambdas: Lambdas = 0.6) -> list[torch.Tensor]:
    """Per merged parameter, the ``[K, *shape]`` bool TALL masks
    ``m_t = |tau_t| > lambda_t * |sum_s tau_s - tau_t|``.

    Follows nik-dim/tall_masks (commit d10af8b) ``src/utils/tallmask_utils.py``
    ``generate_task_masks``: the multi-task vector is the plain sum of the task vectors (L50-51;
    ``src/eval/aggregation.py`` L112-113, with ``method.k=100``, i.e. no top-k filtering, in
    ``config/method/tall_mask.yaml``); the mask compares ``|theta_0 - theta_t|`` with
    ``|theta_mt - theta_t| * lambda`` by a strict ``>`` (L53-61), i.e. lambda scales the
    distance to the multi-task model, ``|sum tau - tau_t|``. Computed here from the task vectors
    directly (the same quantities without the round trip through absolute weights).

    Args:
        task_vectors: the K task vectors.
        lambdas: one lambda for every task, or a task -> lambda mapping (default 0.6, the
            largest value of the official per-task validation search over {0.2, 0.3, 0.4, 0.5, 0.6},
            ``tallmask_utils.py`` L96, L128-140).
    """
    lam = _lambda_vector(task_vectors, lambdas)
    return [_tall_mask(tau, lam) for tau in task_vectors.tensors]


def _per_task_state(loaded: LoadedPool,
                    merged: Callable[[TaskVectors, int], Mapping[str, torch.Tensor]]
                    ) -> dict[str, Callable[[], StateDict]]:
    """Per task, a callable building the encoder's full state dict with ``merged(tv, k)``'s
    tensors replacing the merged parameters (computed when called)."""
    cache: dict[str, TaskVectors] = {}

    def build(k: int) -> StateDict:
        if "tv" not in cache:
            cache["tv"] = _dense(loaded.task_vectors)
        state = {n: t.detach() for n, t in loaded.encoder.state_dict().items()}
        state.update(merged(cache["tv"], k))
        return state
    return {t: (lambda k=k: build(k)) for k, t in enumerate(loaded.task_vectors.task_names)}


def tall_masks(loaded: LoadedPool, lambdas: Lambdas = 0.6) -> dict[str, Callable[[], StateDict]]:
    """TALL masks: per task t, ``theta_t = theta_0 + m_t * sum_s tau_s`` (one model per task).

    ``m_t`` is :func:`tall_mask_tensors`'s mask. The masked vector is the *unscaled* sum of the
    task vectors: the official evaluation applies ``mask * merged_tv`` with ``scaling_coef=1.0``
    (nik-dim/tall_masks ``src/eval/eval.py`` L60-67; ``src/eval/eval_utils.py`` L55-58;
    ``evaluate_task_vector`` L100-101 evaluates ``tall_mask`` at coefficient 1.0 only), with
    ``merged_tv = sum`` (``src/eval/aggregation.py`` L112-113), not the task-arithmetic scaling.
    The official code picks each task's lambda on its validation split from {0.2, ..., 0.6}
    (``tallmask_utils.py`` L120-145); here lambdas are given (default 0.6 for every task).

    Memory: each callable computes its task's masks parameter by parameter when called; nothing
    is precomputed (LoRA pools are densified once, on the first call).

    Args:
        loaded: the pool (its encoder holds the base weights).
        lambdas: one lambda, or a task -> lambda mapping.
    """
    lam = _lambda_vector(loaded.task_vectors, lambdas)

    def merged(tv: TaskVectors, k: int) -> dict[str, torch.Tensor]:
        base = dict(loaded.encoder.named_parameters())
        out = {}
        for name, tau in zip(tv.names, tv.tensors):
            total = tau.float().sum(0)
            own = tau[k].float()
            mask = own.abs() > (total - own).abs() * float(lam[k])  # row k of _tall_mask
            b = base[name].detach()
            out[name] = (b.float() + torch.where(mask, total, _zero(total))).to(b.dtype)
        return out
    return _per_task_state(loaded, merged)


def consensus_task_vectors(task_vectors: TaskVectors, k: int = 2, lambdas: Lambdas = 0.6) -> TaskVectors:
    """Consensus masking: every task vector keeps only the entries that at least ``k`` of the K
    TALL masks keep (one mask, the same for every task).

    Follows nik-dim/tall_masks ``src/utils/tallmask_utils.py`` ``construct_consensus_mask``
    (L193-224): per entry, the number of tasks whose TALL mask is on (L218-219), kept when
    ``count >= k`` (L221). ``k = 0`` keeps everything (task arithmetic), ``k = 1`` removes the
    "catastrophic" weights, ``k = 2`` also the "selfish" ones, ``k > K`` everything (the base)
    (L199-203). The official code masks the summed multi-task vector (``aggregation.py``
    L124-136); masking each task vector by the same mask and summing is the same vector. The TALL
    masks it counts are the per-task masks picked on validation (``load_tall_mask``, L163-190);
    here they use ``lambdas``.

    Args:
        task_vectors: the K task vectors (not modified).
        k: minimum number of tasks (default 2, ``config/method/consensus.yaml``).
        lambdas: TALL-mask lambdas, as :func:`tall_mask_tensors` (default 0.6).

    Returns:
        K task vectors, ``meta["transform"] = "consensus(k=..,lambdas=..)"``.
    """
    if int(k) != k or k < 0:
        raise ValueError(f"consensus k must be an integer >= 0, got {k}")
    lam = _lambda_vector(task_vectors, lambdas)
    tensors = []
    for tau in task_vectors.tensors:
        keep = _tall_mask(tau, lam).sum(0) >= k
        tensors.append(torch.where(keep, tau, _zero(tau)))
        del keep
    shown = dict(lambdas) if isinstance(lambdas, Mapping) else lambdas
    return _with_transform(task_vectors, tensors, f"consensus(k={k},lambdas={shown})")


def consensus(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], k: int = 2,
              lambdas: Lambdas = 0.6, scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Consensus task arithmetic: ``base + scaling * sum_t (consensus mask * tau_t)``.

    The official code applies the masked multi-task vector with a coefficient picked on the
    validation splits from ``linspace(0, 1, 11)[1:]`` = 0.1 ... 1.0 (nik-dim/tall_masks
    ``src/eval/eval.py`` L108-109, ``n_eval_points: 21`` in ``config/config.yaml``;
    ``src/eval/eval_utils.py`` L44-47).

    Args:
        task_vectors, base: as every static merge.
        k, lambdas: as :func:`consensus_task_vectors` (defaults 2, 0.6).
        scaling: task-arithmetic coefficient (default 0.3; picked on a labeled split when tuned).
    """
    return task_arithmetic(consensus_task_vectors(task_vectors, k, lambdas), base, scaling)


# ----------------------------------------------------------------------------------------- EMR


def emr(loaded: LoadedPool) -> dict[str, Callable[[], StateDict]]:
    """EMR-merging (Elect, Mask & Rescale): per task t,
    ``theta_t = theta_0 + lambda_t * (m_t * tau_uni)`` (one model per task; no hyper-parameter).

    Follows harveyhuang18/EMR_Merging (commit cc225ec) ``merge_vit/src/main_emr_merging.py``
    ``emr_merge`` (L41-74) and its use (L100-104):

    * elect: per entry, ``flag = +1`` where the *mean* of the task vectors is ``> 0`` and ``-1``
      otherwise, zero included (L51, L57);
    * mask: ``m_t = tau_t * flag > 0`` (L61);
    * unified vector: ``tau_uni = flag * max_t |m_t * tau_t|`` (0 where no task agrees; L58,
      L63-64, L66);
    * rescaler: ``lambda_t = sum_p mean|tau_t[p]| / sum_p mean|m_t[p] * tau_uni[p]|``: the sums
      run over the parameter tensors ``p`` of *per-tensor means* (L65, L69-72), not over all
      entries, so large and small tensors weigh alike;
    * model: ``theta_0 + tau_uni * m_t * lambda_t`` (L103-104), no other scaling.

    Every merged parameter takes part (the official task vectors hold every floating tensor,
    ``merge_vit/src/task_vectors.py`` L21-24). A task whose masked unified vector is all zero
    (its task vector is zero) gets ``lambda_t = 0`` instead of 0/0; its model is the base either
    way.

    Memory: the unified vector (one float32 copy of the merged parameters) and the K rescalers
    are computed on the first call; each callable then builds only its own task's state dict.

    Args:
        loaded: the pool (its encoder holds the base weights).
    """
    shared: dict[str, object] = {}

    def elect(tv: TaskVectors) -> tuple[list[torch.Tensor], torch.Tensor]:
        if "unified" not in shared:
            num, den = torch.zeros(tv.num_tasks), torch.zeros(tv.num_tasks)
            unified = []
            for tau in tv.tensors:
                t = tau.float()
                flag = torch.where(t.sum(0) > 0, 1.0, -1.0)  # sign of the mean: sum > 0 iff mean > 0
                agree = t * flag > 0
                uni = torch.where(agree, t.abs(), _zero(t)).amax(0) * flag
                k_count = t.shape[0]
                num += t.abs().reshape(k_count, -1).mean(1).cpu()
                den += torch.where(agree, uni.abs(), _zero(t)).reshape(k_count, -1).mean(1).cpu()
                unified.append(uni)
                del t, flag, agree
            shared["unified"] = unified
            shared["rescale"] = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny),
                                            torch.zeros(()))
        return shared["unified"], shared["rescale"]  # type: ignore[return-value]

    def merged(tv: TaskVectors, k: int) -> dict[str, torch.Tensor]:
        unified, rescale = elect(tv)
        base = dict(loaded.encoder.named_parameters())
        out = {}
        for name, tau, uni in zip(tv.names, tv.tensors, unified):
            # m_k = tau_k * flag > 0; where uni != 0, flag = sign(uni), and where uni == 0 the
            # product is 0 whatever the mask, so tau_k * uni > 0 selects the same entries
            mask = tau[k].float() * uni > 0
            b = base[name].detach()
            out[name] = (b.float() + float(rescale[k]) * torch.where(mask, uni, _zero(uni))).to(b.dtype)
        return out
    return _per_task_state(loaded, merged)
