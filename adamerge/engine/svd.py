"""The SVD step shared by the SVD-based merges (TSV-M, Iso-C, Iso-CTS).

* :func:`svd`: the thin SVD of one matrix or a ``[K, m, n]`` stack (the K per-task SVDs of one
  parameter in one call), in float32 on the tensor's device; when float32 fails to converge
  (``torch.linalg.LinAlgError``, or non-finite singular values on devices that do not raise) it is
  recomputed in float64 and the fallback is logged (float32 SVDs of Iso-CTS's rank-deficient
  projected task matrices were reported not to converge on ViT-B/32 shapes).
* :func:`top_svd`: only the top ``k`` singular triplets, from the float64 eigendecomposition of
  the Gram matrix of the smaller side (``solver="gram"``, exact up to round-off, 0.6-0.75x a
  float32 SVD's time on CPU for ViT-B/32 shapes, with :func:`svd` where the kept singular values span more than
  :data:`GRAM_SPAN` or reach zero), sliced from :func:`svd` (``"full"``, exact) or from
  ``torch.svd_lowrank`` (``"lowrank"``: randomized range finder
  with ``max(oversample, k)`` extra columns and ``niter`` power iterations, seeded inside
  ``fork_rng`` so that it is deterministic and leaves the global RNG alone). ``lowrank`` is about
  twice as cheap as a full SVD for ``k <= min(m, n) / 8``, and accurate when the spectrum has
  decayed well before the ``2k``-th value (low rank plus noise); on slowly decaying spectra the
  top ``k`` it returns differ from the exact ones (a TSV-M merge may move by several percent), so
  it is opt-in.
* :func:`polar`: the orthogonal polar factor ``P V^T`` of ``A = P S V^T`` (TSV-M's and Iso-CTS's
  orthogonalisation), through :func:`svd`.
* :func:`matrix_names`: which task vectors are merged as matrices (2-D per task and matching no
  ``exclude`` glob); the others are averaged by the methods.
* :func:`cached`: an optional on-disk cache of a merge's result (``<cache_dir>/svd/<key>.safetensors``,
  written atomically; the key hashes the task vectors' fingerprint, the method and its parameters,
  and a content probe stored in the file guards against a stale file), plus a small in-process memo,
  so that a scaling search calls the SVDs once, not once per grid point.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch

from ..io.cache import default_cache_dir
from ..io.checkpoints import load_state_dict, save_state_dict
from .task_vectors import TaskVectors

log = logging.getLogger(__name__)

Solver = Literal["gram", "full", "lowrank"]
SOLVERS: tuple[str, ...] = ("gram", "full", "lowrank")
GRAM_SPAN = 1e4   # gram solver: the largest s_1 / s_k it trusts (float64 error ~ 1e-16 * span^2)
OVERSAMPLE = 16   # least extra random columns of the lowrank range finder (see lowrank_columns)
NITER = 3         # power iterations of the lowrank range finder
SEED = 0          # seed of the lowrank range finder
MEMO_SIZE = 2     # merges kept in memory (per process) for repeated calls on the same task vectors


# ------------------------------------------------------------------------ the decompositions
def _where(name: str) -> str:
    return f" of {name!r}" if name else ""


def svd(x: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``x = U diag(S) Vh`` of ``[..., m, n]`` in float32 on ``x``'s device.

    Batched over the leading dimensions (one call for the K tasks of a parameter); a wide matrix
    (``m < n``) is decomposed through its transpose (faster, same factors). When float32
    does not converge (``torch.linalg.LinAlgError``, or non-finite singular values) the SVD is
    recomputed in float64 (logged at INFO) and returned in float32. ``name`` labels messages.
    """
    # LAPACK's divide and conquer is much slower on wide matrices (768x3072: 4.1 s vs 2.3 s for
    # K=8 on 2 cores); the SVD of the transpose is the same decomposition with U and V swapped.
    wide = x.shape[-2] < x.shape[-1]
    tall = x.mT if wide else x
    work = tall if tall.dtype == torch.float64 else tall.float()
    try:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        if not bool(torch.isfinite(s).all()):
            raise torch.linalg.LinAlgError("non-finite singular values")
    except torch.linalg.LinAlgError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the task vectors{_where(name)} {tuple(x.shape)} have non-finite entries; "
                             "cannot take their SVD") from exc
        if work.dtype == torch.float64:
            raise torch.linalg.LinAlgError(f"float64 SVD{_where(name)} {tuple(x.shape)} failed: {reason}") from exc
        log.info("adamerge: float32 SVD%s %s did not converge (%s); recomputing in float64",
                 _where(name), tuple(x.shape), reason)
        u, s, vh = torch.linalg.svd(tall.double(), full_matrices=False)
    u, s, vh = u.float(), s.float(), vh.float()
    return (vh.mT, s, u.mT) if wide else (u, s, vh)


def lowrank_columns(k: int, r: int, oversample: int | None = None) -> int:
    """The columns ``q`` of the lowrank range finder for the top ``k`` of ``r`` triplets:
    ``k + max(oversample, k)``, at most ``r``. The error of the ``k``-th triplet shrinks about as
    ``(s_{q+1} / s_k) ^ (2 niter + 1)``; with ``q = 2k`` and 3 iterations, TSV-M's merge of 8 tasks
    on 2304x768 matrices with spectrum ``s_i = i^-1`` is 0.2% off the exact one, at ~0.55x its time."""
    return min(r, k + max(OVERSAMPLE if oversample is None else oversample, k))


def check_solver(solver: str) -> str:
    """``solver`` if it is one of :data:`SOLVERS`, else a one-line error."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return solver


def _lowrank(x: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, ...]:
    devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        return torch.svd_lowrank(x, q=q, niter=niter)


def _gram_top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top ``k`` triplets from the float64 eigendecomposition of the Gram matrix of ``x``'s
    smaller side (``V``, ``S^2`` from ``X^T X``; ``U = X V / S``), or ``None`` when the kept
    singular values span more than :data:`GRAM_SPAN` (or reach zero), where squaring loses digits."""
    wide = x.shape[-2] < x.shape[-1]
    t = (x.mT if wide else x).double()                         # [..., M, r], M >= r
    try:
        w, v = torch.linalg.eigh(t.mT @ t)                     # ascending eigenvalues
    except torch.linalg.LinAlgError:
        return None
    s = w[..., -k:].flip(-1).clamp_min(0).sqrt()
    if not bool(torch.isfinite(s).all()) or bool((s[..., -1] * GRAM_SPAN <= s[..., 0]).any()):
        return None
    v = v[..., -k:].flip(-1)
    u = (t @ v) / s.unsqueeze(-2)
    u, s, v = u.float(), s.float(), v.float()
    return (v, s, u) if wide else (u, s, v)


def top_svd(x: torch.Tensor, k: int, solver: Solver = "full", name: str = "",
            oversample: int | None = None, niter: int | None = None,
            seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``[..., m, n]``: ``U [..., m, k]``, ``S [..., k]``
    (descending), ``V [..., n, k]`` (note: ``V``, not ``V^T``), float32.

    ``solver``: ``full`` slices :func:`svd`; ``gram`` takes them from the float64 eigenvectors of
    the Gram matrix of the smaller side (``X^T X`` or ``X X^T``): more accurate than a float32 SVD
    and 0.6-0.75x its time on CPU for ViT-B/32 shapes, falling back to :func:`svd` (logged)
    for a stack whose top ``k`` singular values span more than :data:`GRAM_SPAN` or reach zero
    (rank-deficient), where squaring would lose their digits; ``lowrank`` uses ``torch.svd_lowrank`` with
    :func:`lowrank_columns` columns and ``niter`` power iterations, seeded by ``seed`` (float64 when
    float32 fails), or :func:`svd` when those columns would be the whole rank. ``None``: the
    module's :data:`OVERSAMPLE`, :data:`NITER`, :data:`SEED`.
    """
    niter = NITER if niter is None else niter
    seed = SEED if seed is None else seed
    m, n = x.shape[-2:]
    r = min(m, n)
    if not 0 < k <= r:
        raise ValueError(f"top_svd{_where(name)}: k must be in [1, {r}], got {k}")
    if check_solver(solver) == "gram":
        top = _gram_top(x, k)
        if top is not None:
            return top
        # (non-finite task vectors end here too: the full SVD names them)
        log.info("adamerge: the top %d singular values%s %s span more than %g or reach zero; "
                 "using the full SVD", k, _where(name), tuple(x.shape), GRAM_SPAN)
        solver = "full"
    q = lowrank_columns(k, r, oversample)
    if solver == "full" or q >= r:
        u, s, vh = svd(x, name)
        return u[..., :k], s[..., :k], vh[..., :k, :].mT
    work = x.float()
    try:
        u, s, v = _lowrank(work, q, niter, seed)
        if not bool(torch.isfinite(s).all()):
            raise torch.linalg.LinAlgError("non-finite singular values")
    except torch.linalg.LinAlgError as exc:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the task vectors{_where(name)} {tuple(x.shape)} have non-finite "
                             "entries; cannot take their SVD") from exc
        log.info("adamerge: float32 lowrank SVD%s %s failed (%s); recomputing in float64",
                 _where(name), tuple(x.shape), exc)
        u, s, v = _lowrank(x.double(), q, niter, seed)
    return u[..., :k].float(), s[..., :k].float(), v[..., :k].float()


def polar(a: torch.Tensor, name: str = "") -> torch.Tensor:
    """The orthogonal polar factor of ``a`` (``[..., m, c]``): ``P Q^T`` from its thin SVD
    ``a = P diag(s) Q^T``, the orthonormal matrix closest to ``a`` (orthonormal columns when
    ``c <= m``, rows otherwise)."""
    p, _, qh = svd(a, name)
    return p @ qh


# ------------------------------------------------------------------------ what is a matrix
def matrix_names(task_vectors: TaskVectors, exclude: Sequence[str] = ()) -> list[str]:
    """The parameters merged as matrices: 2-D per task (``[K, m, n]`` stacks) and matching no
    ``exclude`` glob (``fnmatch``, case-sensitive). Every other one is averaged by the methods."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    return [n for n, t in zip(task_vectors.names, task_vectors.tensors)
            if t.dim() == 3 and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


# ------------------------------------------------------------------------ cache and memo
def _probe(task_vectors: TaskVectors) -> list[list[list[float]]]:
    """Per parameter, per task: ``[<tau, w>, ||tau||]`` with a fixed unit vector ``w`` (``cos(0.618 i)``
    normalised); a file whose probe differs beyond round-off was computed from other task vectors."""
    out = []
    for t in task_vectors.tensors:
        flat = t.detach().reshape(t.shape[0], -1).float()
        w = torch.cos(torch.arange(flat.shape[1], device=flat.device, dtype=torch.float32) * 0.618)
        w = w / w.norm().clamp_min(1e-30)
        out.append(torch.stack([flat @ w, flat.norm(dim=1)], dim=1).tolist())
    return out


def _probe_matches(saved: object, now: list, rtol: float = 1e-4) -> bool:
    """Whether two :func:`_probe` values agree to ``rtol`` of each task vector's norm."""
    if not isinstance(saved, list) or len(saved) != len(now):
        return False
    for p_saved, p_now in zip(saved, now):
        if not isinstance(p_saved, list) or len(p_saved) != len(p_now):
            return False
        for pair_saved, (dot, norm) in zip(p_saved, p_now):
            tol = rtol * norm + 1e-30
            if len(pair_saved) != 2 or abs(pair_saved[0] - dot) > tol or abs(pair_saved[1] - norm) > tol:
                return False
    return True


def cache_key(task_vectors: TaskVectors, method: str, params: Mapping[str, object],
              fingerprint: dict | None = None) -> str:
    """A 20-hex-digit key of the task vectors' fingerprint (tasks, shapes, norm hash, transform;
    ``fingerprint`` if already computed), their storage dtypes, ``method`` and its ``params``."""
    key = json.dumps({"fingerprint": fingerprint or task_vectors.fingerprint(),
                      "dtypes": [str(t.dtype) for t in task_vectors.tensors],
                      "method": method, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cache_path(task_vectors: TaskVectors, method: str, params: Mapping[str, object],
               cache_dir: str | Path, fingerprint: dict | None = None) -> Path:
    """``<cache_dir>/svd/<cache_key>.safetensors``; ``cache_dir="default"`` is
    :func:`adamerge.io.cache.default_cache_dir`."""
    root = default_cache_dir() if str(cache_dir) == "default" else Path(cache_dir).expanduser()
    return root / "svd" / f"{cache_key(task_vectors, method, params, fingerprint)}.safetensors"


def _read(path: Path, expected: Mapping[str, torch.Size], probe: list,
          device: torch.device) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None (logged) when the file is unreadable or not of these task vectors."""
    try:
        stored = load_state_dict(path)
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            saved_probe = json.loads((f.metadata() or {}).get("probe", "null"))
    except Exception as exc:  # any unreadable file is a miss: the merge is recomputed and rewritten
        log.info("adamerge: SVD cache %s unreadable (%s); recomputing", path, exc)
        return None
    if set(stored) != set(expected) or any(stored[n].shape != s for n, s in expected.items()) \
            or not _probe_matches(saved_probe, probe):
        log.info("adamerge: SVD cache %s does not match these task vectors; recomputing", path)
        return None
    return {n: stored[n].to(device) for n in expected}


# id(task vectors) -> key -> (tensors, versions, result); a finalizer drops an object's entries
_MEMO: "OrderedDict[tuple[int, str], tuple[tuple, tuple, dict]]" = OrderedDict()
_WATCHED: set[int] = set()


def _forget(obj_id: int) -> None:
    _WATCHED.discard(obj_id)
    for k in [k for k in _MEMO if k[0] == obj_id]:
        del _MEMO[k]


def clear_memo() -> None:
    """Drop the in-process results kept for repeated calls (frees their memory)."""
    _MEMO.clear()


def cached(task_vectors: TaskVectors, method: str, params: Mapping[str, object],
           compute: Callable[[], dict[str, torch.Tensor]], cache_dir: str | Path | None = None,
           memo: bool = True, stacked: bool = False) -> dict[str, torch.Tensor]:
    """``compute()`` (a merge's per-parameter result, before any scaling), reused when possible.

    * In process (``memo``): the last :data:`MEMO_SIZE` results are kept, keyed by the task-vector
      object, ``method`` and ``params``; a hit needs the very same tensors, not modified in place
      since (their version counters), so a scaling search runs the SVDs once. Dropped when the
      task vectors are garbage-collected, or by :func:`clear_memo`.
    * On disk (``cache_dir`` given; off by default): :func:`cache_path`, safetensors written
      atomically; read back only when its names, shapes and content probe match. A file that
      cannot be written is logged and skipped.

    ``stacked``: the result holds ``[K, *shape]`` tensors (per-task components), not ``[*shape]``.
    The result must not be modified in place by the caller (it may be shared with later calls).
    """
    memo_key = (id(task_vectors),
                json.dumps({"method": method, "params": params}, sort_keys=True, default=str))
    tensors = tuple(task_vectors.tensors)
    versions = tuple(t._version for t in tensors)
    if memo and memo_key in _MEMO:
        held, held_versions, result = _MEMO[memo_key]
        if len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors)) \
                and held_versions == versions:
            _MEMO.move_to_end(memo_key)
            return result
        del _MEMO[memo_key]
    result = path = probe = fingerprint = None
    if cache_dir is not None:
        fingerprint = task_vectors.fingerprint()
        path = cache_path(task_vectors, method, params, cache_dir, fingerprint)
        probe = _probe(task_vectors)
        if path.is_file():
            expected = {n: t.shape if stacked else t.shape[1:] for n, t in zip(task_vectors.names, tensors)}
            device = tensors[0].device if tensors else torch.device("cpu")
            result = _read(path, expected, probe, device)
            if result is not None:
                log.info("adamerge: %s read from the SVD cache %s", method, path)
    if result is None:
        result = compute()
        if path is not None:
            try:
                save_state_dict({n: t.detach().float().cpu() for n, t in result.items()}, path,
                                metadata={"method": method,
                                          "params": json.dumps(params, sort_keys=True, default=str),
                                          "fingerprint": json.dumps(fingerprint, sort_keys=True),
                                          "probe": json.dumps(probe)})
                log.info("adamerge: %s cached at %s", method, path)
            except OSError as exc:
                log.warning("adamerge: could not write the SVD cache %s (%s); continuing without it",
                            path, exc)
    if memo:
        try:
            if id(task_vectors) not in _WATCHED:
                weakref.finalize(task_vectors, _forget, id(task_vectors))
                _WATCHED.add(id(task_vectors))
        except TypeError:  # an object without weak references: no memo for it
            return result
        _MEMO[memo_key] = (tensors, versions, result)
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    return result
