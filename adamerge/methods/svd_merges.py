"""SVD-based static merges: TSV-M, Iso-C and Iso-CTS (and TSV-M's K components for AdaMerging).

Every merge has the static signature ``method(task_vectors, base, **hparams) -> {name: tensor}``
(see :mod:`adamerge.methods.static`) and returns ``base + scaling * delta`` for every parameter
with task vectors. Task vectors that are 2-D per task (``[K, m, n]``) and match no ``exclude`` glob
are merged as matrices through the shared SVD step :mod:`adamerge.engine.svd` (float32 on the
task vectors' device, float64 when float32 does not converge); every other one (biases, norms,
embeddings, 4-D convolutions) is averaged over the tasks, as in both official codes.

Facts taken from the official code (read, not copied):

* TSV-M, Gargiulo et al., CVPR 2025, ``AntoAndGar/task_singular_vectors`` at ``a6c9718``,
  ``src/utils/TSVM_utils.py`` ``compute_and_sum_svd_mem_reduction`` (L303-377; the ``TSVM`` method,
  ``src/eval/aggregation.py`` L290-294):

  - matrices are the 2-D task vectors whose key lacks ``text_projection`` (L332-335), hence the
    default ``exclude``; the others are averaged, a running mean over tasks (L357-361);
  - per task, ``torch.linalg.svd(full_matrices=False)`` (L336), keeping the top
    ``int(r * (1 / K))`` triplets, ``r = min(m, n)`` (L320, L343; equal to ``r // K``);
  - task ``i``'s triplets fill block ``[i k, (i + 1) k)`` of zero ``[m, r]``, ``[r]``, ``[r, n]``
    buffers (L340-355); columns left over when ``K`` does not divide ``r`` stay zero, with zero
    singular values, so dropping them (as here) changes nothing;
  - ``U`` and ``V^T`` are each replaced by their polar factor from a second SVD (``u_u @ v_u``,
    ``u_v @ v_v``) and the merge is ``U_orth diag(S) V_orth^T`` (L363-375);
  - the scaling alpha is searched over ``np.linspace(0, 3, 31)[1:]`` = 0.1 ... 3.0
    (``src/eval/eval.py`` L202-207, ``config/config.yaml`` L17 ``n_eval_points: 31``) and picked by
    the validation ``avg_normalized_top1`` (``src/eval/eval_utils.py`` L67-72); the merged model is
    ``pretrained + alpha * merged`` (the averaged tensors are scaled too).

* Iso-C / Iso-CTS, Marczak et al., ICML 2025, ``danielm1405/iso-merging`` at ``d34010a``,
  ``src/utils/iso.py``:

  - Iso-C (L5-27): the mean over tasks for every tensor (L12); for matrices (2-D, no
    ``text_projection``, L14) the sum (L15), its thin SVD (L16), every singular value replaced by
    their mean (L17), ``U diag(mean) V^T`` (L19-25);
  - Iso-CTS (L30-104): non-matrices averaged (L39-48); the sum's SVD (L51, L58); the common size
    ``c = int(r * common_space_fraction)``, then ``r - round((r - c) / K) * K`` so that the rest
    divides by K (L54-56, Python's round: half to even); the common space = the sum's top ``c``
    triplets (L59-61); per task, the task vector projected off the common left space,
    ``w - U_c U_c^T w`` (L70), its SVD (L71), its top ``(r - c) / K`` triplets (L65, L78-80); the
    task blocks first, then the common block (L83-85); ``U`` and ``V^T`` orthogonalised by their
    polar factors from an SVD (L88-91); every singular value replaced by the mean over all ``r``
    (common and task-specific) (L94); ``U diag(mean) V^T`` (L96-102);
  - ``common_space_fraction: 0.8`` (``config/method/iso_cts.yaml``, README L49); alpha searched over
    the same ``linspace(0, 3, 31)[1:]`` as TSV-M (``src/eval/eval.py`` L153-154) with early stopping
    after 3 non-improving values (``config/config.yaml`` L24-26), picked by ``avg_normalized_top1``.

Differences from the official code (results equal up to SVD round-off unless stated):

* TSV-M's per-task top triplets come, by default (``solver="gram"``), from one batched float64
  ``eigh`` of the K Gram matrices of a parameter's smaller side (``V`` and ``S^2``; ``U = X V / S``),
  not from K float32 SVDs: equal up to round-off and closer to a float64 SVD (relative error of the
  merge 3-5e-6 vs 7-34e-6 for the official float32 code on ViT-B/32 shapes), in 0.59x the
  official code's time (``adamerge bench --svd``). A stack whose top ``r / K`` singular values span more than 1e4 or reach zero (rank-deficient
  task vectors) takes the float32 SVD instead (logged). ``solver="full"`` is the official float32
  SVD (batched; a wide matrix through its transpose, which LAPACK decomposes faster).
  TSV-M's ``solver="lowrank"`` (opt-in)
  computes only the top triplets with a seeded randomized SVD (``torch.svd_lowrank``): 0.4x the
  time of the official code on CPU, equal to the exact merge to a tolerance when the task
  vectors' spectra have decayed well before ``2 r / K`` (0.2% off for ``s_i ~ 1 / i``), several
  percent off on slowly decaying spectra (the polar factors give every kept direction full
  weight, whatever its singular value). ``"full"`` (default) is exact. Iso-CTS is always exact.
* float32 SVDs that do not converge are redone in float64 (the official run would stop).
* TSV-M: when ``r // K == 0`` (a matrix with fewer singular values than tasks) each task keeps its
  top direction (logged); the official code keeps none, leaving that matrix at the pretrained value.
* Iso-CTS: the left polar factor is computed as ``[U_c, polar(T)]`` (``T``: the task blocks,
  orthogonal to ``U_c`` by construction), identical in exact arithmetic to the polar factor of
  ``[T, U_c]`` and one ``m x r`` SVD cheaper. For matrices with ``m <= n`` the sum's left singular
  vectors are a basis of ``R^m``, so the projected task vector is ``U_rest (U_rest^T w)`` and its SVD
  comes from the small ``(r - c) x n`` matrix ``U_rest^T w`` (exact; no SVD of the rank-deficient
  ``m x n`` projection, the one float32 fails on). When the official rounding would make the common
  size negative (tiny ``common_fraction`` on small matrices) the per-task size is floored instead.
* The scaling search is the caller's (the registry's ``tune`` grid); 1.0 when not searched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from ..engine import svd as svd_step
from ..engine.svd import Solver, cached, matrix_names, polar, top_svd
from ..engine.task_vectors import TaskVectors

log = logging.getLogger(__name__)

# Matrices the official codes average instead (TSVM_utils.py L332-335, iso.py L14, L39).
DEFAULT_EXCLUDE: tuple[str, ...] = ("*text_projection*",)
# The official alpha grid of all three methods: np.linspace(0.0, 3.0, 31)[1:].
SCALING_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 31))


def _progress(names: Sequence[str], what: str):
    return tqdm(names, desc=f"{what}: SVD of the task vectors", disable=None, leave=False)


def _per_matrix(task_vectors: TaskVectors, exclude: Sequence[str], what: str,
                merge: Callable[[torch.Tensor, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``merge(tau [K, m, n], name)`` for every matrix of ``task_vectors`` (2-D tensors not
    excluded), the mean over tasks for every other tensor: the shape all three methods share."""
    matrices = set(matrix_names(task_vectors, exclude))
    return {name: merge(tau, name) if name in matrices else tau.float().mean(0)
            for name, tau in zip(_progress(task_vectors.names, what), task_vectors.tensors)}


def _scaled(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor],
            delta: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """``base + scaling * delta`` for every parameter with task vectors, in the base dtype."""
    out = {}
    for name in task_vectors.names:
        b = base[name]
        out[name] = (b.float() + float(scaling) * delta[name].to(b.device)).to(b.dtype)
    return out


def _params(solver: str, exclude: Sequence[str], **more: object) -> dict[str, object]:
    """The parameters a result depends on (its cache and memo key); refuses an unknown solver."""
    svd_step.check_solver(solver)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    out: dict[str, object] = {"solver": solver, "exclude": exclude, **more}
    if solver == "lowrank":
        out.update(oversample=svd_step.OVERSAMPLE, niter=svd_step.NITER, seed=svd_step.SEED)
    return out


# ------------------------------------------------------------------------ TSV-M
def _tsv_blocks(tau: torch.Tensor, name: str, solver: Solver,
                thin: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """TSV-M for one ``[K, m, n]`` stack: ``U_orth [m, K k]``, ``S [K, k]``, ``V_orth [n, K k]``, ``k``;
    task ``i`` owns columns ``[i k, (i + 1) k)``; the merge is ``U_orth diag(S) V_orth^T``."""
    n_tasks, m, n = tau.shape
    k = min(m, n) // n_tasks
    if k == 0:
        thin.append(name)
        k = 1
    u, s, v = top_svd(tau, k, solver, name)                       # [K, m, k], [K, k], [K, n, k]
    u_cat = u.permute(1, 0, 2).reshape(m, n_tasks * k)
    v_cat = v.permute(1, 0, 2).reshape(n, n_tasks * k)
    return polar(u_cat, name), s, polar(v_cat, name), k


def _log_thin(thin: list[str], n_tasks: int) -> None:
    if thin:
        log.info("adamerge: TSV-M: %d matri%s with fewer singular values than the %d tasks (%s%s): "
                 "keep 1 direction per task (floor(r / K) = 0; the official code would leave %s at "
                 "the base)", len(thin), "x" if len(thin) == 1 else "ces", n_tasks,
                 ", ".join(thin[:3]), ", ..." if len(thin) > 3 else "", "it" if len(thin) == 1 else "them")


def tsv_m_deltas(task_vectors: TaskVectors, solver: Solver = "gram",
                 exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """TSV-M's merged task vector (before scaling), float32: per matrix
    ``U_orth diag(S_cat) V_orth^T`` (see the module doc), every other tensor averaged."""
    params = _params(solver, exclude)

    def compute() -> dict[str, torch.Tensor]:
        thin: list[str] = []

        def merge(tau: torch.Tensor, name: str) -> torch.Tensor:
            u, s, v, _ = _tsv_blocks(tau, name, solver, thin)
            return (u * s.reshape(-1)) @ v.mT
        out = _per_matrix(task_vectors, params["exclude"], "TSV-M", merge)
        _log_thin(thin, task_vectors.num_tasks)
        return out

    return cached(task_vectors, "tsv_m", params, compute, cache_dir)


def tsv_m(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], scaling: float = 1.0,
          solver: Solver = "gram", exclude: Sequence[str] = DEFAULT_EXCLUDE,
          cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """TSV-M (Task Singular Vectors: Merge): ``base + scaling * delta``.

    Per matrix, each task's top ``floor(r / K)`` singular triplets are concatenated and the stacked
    left and right singular vectors are orthogonalised (polar factors), ``delta = U_orth diag(S)
    V_orth^T``; other tensors: the mean over tasks. ``scaling``: the official searches 0.1 ... 3.0
    on validation; 1.0 without a search.

    Args:
        solver: how each task's top triplets are computed: ``gram`` (default; float64
            eigendecomposition of the Gram matrix, more accurate than a float32 SVD and 0.59x the
            official code's time on CPU), ``full`` (float32 SVD, as the official code) or
            ``lowrank`` (randomized, approximate; see the module doc and :mod:`adamerge.engine.svd`).
        exclude: globs of 2-D task vectors to average instead (default: ``*text_projection*``).
        cache_dir: cache the merge under ``<cache_dir>/svd/`` (``"default"``: the adamerge cache);
            off when None. Repeated calls in one process reuse the merge anyway (scaling search).
    """
    return _scaled(task_vectors, base, tsv_m_deltas(task_vectors, solver, exclude, cache_dir), scaling)


def tsv_m_task_vectors(task_vectors: TaskVectors, solver: Solver = "gram",
                       exclude: Sequence[str] = DEFAULT_EXCLUDE,
                       cache_dir: str | Path | None = None) -> TaskVectors:
    """TSV-M's K per-task components, a transform like :func:`~adamerge.methods.static.ties_task_vectors`.

    Component ``i`` of a matrix is ``U_orth[:, block i] diag(S_i) V_orth[:, block i]^T`` (task
    ``i``'s orthogonalised top singular triplets); of any other tensor ``tau_i / K``. The K
    components sum to :func:`tsv_m_deltas`, so AdaMerging on them starts from TSV-M at coefficients
    1.0 (TSV-M with ``scaling=c`` at coefficients ``c``). Stored in the task vectors' dtype.
    """
    params = _params(solver, exclude)

    def compute() -> dict[str, torch.Tensor]:
        matrices = set(matrix_names(task_vectors, params["exclude"]))
        out, thin = {}, []
        n_tasks = task_vectors.num_tasks
        for name, tau in zip(_progress(task_vectors.names, "TSV-M"), task_vectors.tensors):
            if name not in matrices:
                out[name] = tau.float() / n_tasks
                continue
            u, s, v, k = _tsv_blocks(tau, name, solver, thin)
            m, n = tau.shape[1:]
            u_k = u.reshape(m, n_tasks, k).permute(1, 0, 2) * s[:, None, :]   # [K, m, k]
            out[name] = u_k @ v.reshape(n, n_tasks, k).permute(1, 2, 0)      # [K, m, n]
        _log_thin(thin, n_tasks)
        return out

    comps = cached(task_vectors, "tsv_m_components", params, compute, cache_dir, memo=False, stacked=True)
    tensors = [comps[n].to(device=t.device, dtype=t.dtype)
               for n, t in zip(task_vectors.names, task_vectors.tensors)]
    meta = {**task_vectors.meta, "transform": f"tsv_m(solver={solver})"}
    return TaskVectors(list(task_vectors.task_names), list(task_vectors.names), tensors, meta)


# ------------------------------------------------------------------------ Iso-C
def iso_c_deltas(task_vectors: TaskVectors, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Iso-C's merged task vector (before scaling): per matrix, the SVD of the sum of the task
    vectors with every singular value set to their mean; other tensors averaged."""
    params = _params("full", exclude)

    def compute() -> dict[str, torch.Tensor]:
        def merge(tau: torch.Tensor, name: str) -> torch.Tensor:
            u, s, vh = svd_step.svd(tau.float().sum(0), name)
            return s.mean() * (u @ vh)
        return _per_matrix(task_vectors, params["exclude"], "Iso-C", merge)

    return cached(task_vectors, "iso_c", params, compute, cache_dir)


def iso_c(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], scaling: float = 1.0,
          exclude: Sequence[str] = DEFAULT_EXCLUDE,
          cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Iso-C (isotropic merging in the common subspace): ``base + scaling * delta``, ``delta`` the
    sum of the task vectors with a flat spectrum (the mean singular value) per matrix, the mean over
    tasks elsewhere. ``scaling``: the official searches 0.1 ... 3.0 on validation; 1.0 without one.
    ``exclude``, ``cache_dir``: as in :func:`tsv_m`."""
    return _scaled(task_vectors, base, iso_c_deltas(task_vectors, exclude, cache_dir), scaling)


# ------------------------------------------------------------------------ Iso-CTS
def iso_cts_sizes(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(common size, per-task size)`` of Iso-CTS for a matrix of rank ``r`` (iso.py L54-56, L65):
    the per-task sizes fill ``r`` exactly."""
    common = int(r * common_fraction)
    per_task = round((r - common) / n_tasks)
    if per_task * n_tasks > r:  # the official rounding would make the common size negative
        per_task = (r - common) // n_tasks
    return r - per_task * n_tasks, per_task


def _iso_cts_matrix(tau: torch.Tensor, name: str, common_fraction: float) -> torch.Tensor:
    n_tasks, m, n = tau.shape
    r = min(m, n)
    common, per_task = iso_cts_sizes(r, n_tasks, common_fraction)
    u, s, vh = svd_step.svd(tau.float().sum(0), name)
    u_c, s_c, v_c = u[:, :common], s[:common], vh[:common].mT        # [m, c], [c], [n, c]
    if per_task == 0:  # the common space is the whole of it (flat spectrum of the sum: Iso-C)
        return s_c.mean() * (u_c @ v_c.mT)
    if m <= n:  # U is a basis of R^m: the residual is U_rest (U_rest^T w), its SVD from the small factor
        u_rest = u[:, common:]                                          # [m, r - c]
        p, s_t, qh = svd_step.svd(u_rest.mT @ tau.float(), name)        # [K, r - c, n] stack
        u_t, s_t, v_t = u_rest @ p[..., :per_task], s_t[..., :per_task], qh[..., :per_task, :].mT
    else:
        residual = tau.float() - u_c @ (u_c.mT @ tau.float())          # [K, m, n], off the common space
        u_t, s_t, v_t = top_svd(residual, per_task, "full", name)     # [K, m, p], [K, p], [K, n, p]
    t_cat = u_t.permute(1, 0, 2).reshape(m, n_tasks * per_task)
    t_cat = t_cat - u_c @ (u_c.mT @ t_cat)                             # exactly orthogonal to U_c
    u_all = torch.cat([u_c, polar(t_cat, name)], dim=1)               # = polar([U_c, T]): U_c ⟂ T
    v_all = polar(torch.cat([v_c, v_t.permute(1, 0, 2).reshape(n, n_tasks * per_task)], dim=1), name)
    flat = (s_c.sum() + s_t.sum()) / r
    return flat * (u_all @ v_all.mT)


def iso_cts_deltas(task_vectors: TaskVectors, common_fraction: float = 0.8,
                   exclude: Sequence[str] = DEFAULT_EXCLUDE,
                   cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Iso-CTS's merged task vector (before scaling): per matrix, the sum's top ``common_fraction``
    directions plus each task's top directions off that common space, orthogonalised, with a flat
    spectrum (the mean of all their singular values); other tensors averaged."""
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")
    params = _params("full", exclude, common_fraction=float(common_fraction))

    def compute() -> dict[str, torch.Tensor]:
        return _per_matrix(task_vectors, params["exclude"], "Iso-CTS",
                           lambda tau, name: _iso_cts_matrix(tau, name, common_fraction))

    return cached(task_vectors, "iso_cts", params, compute, cache_dir)


def iso_cts(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor], common_fraction: float = 0.8,
            scaling: float = 1.0, exclude: Sequence[str] = DEFAULT_EXCLUDE,
            cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Iso-CTS (isotropic merging in common and task-specific subspaces): ``base + scaling * delta``.

    Per matrix of rank ``r``: the top ``c ~ common_fraction * r`` singular directions of the summed
    task vectors, plus each task's top ``(r - c) / K`` directions after projecting the common left
    space out of it, orthogonalised (polar factors), every singular value set to their mean; other
    tensors: the mean over tasks. ``common_fraction=1.0`` is Iso-C. ``scaling``: the official
    searches 0.1 ... 3.0 on validation; 1.0 without one. ``exclude``, ``cache_dir``: as in
    :func:`tsv_m`. Every SVD is exact (a randomized one is ~20% off on the residuals' flat spectra).
    """
    return _scaled(task_vectors, base, iso_cts_deltas(task_vectors, common_fraction, exclude, cache_dir),
                   scaling)
