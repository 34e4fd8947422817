"""AdaRank: layer-wise coefficients and learned masks over the singular components of each task
vector's attention / MLP matrices, trained by test-time entropy minimisation.

Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Multi-Task Model Merging", 2025
(arXiv 2503.22178); official code david3684/AdaRank, ``vision/src/models/merge_vit/adaptive.py``
(read at ``dfa5358``). Each masked matrix ``l`` is merged as

    theta_l = base_l + sum_k lambda[l, k] * U_kl diag(h(z_kl) * s_kl) V_kl^T

with ``U s V^T`` the full thin SVD of task vector ``k``'s matrix (no truncation), ``z`` learned
logits and ``h(z) = 1[sigmoid(z / T) > 0.5]`` in the forward, the sigmoid's gradient in the backward
(straight-through; ``T = mask_temp``). Every other tensor is merged layer-wise,
``base + sum_k lambda[l, k] * tau_kl``. Logits start at +0.1 (kept; the components from
``int(r * initial_rank_ratio)`` on at -0.1), coefficients at 0.3, not clamped; both are learned by
Adam (lr 1e-3) on the entropy summed over tasks. With every component kept, step 0 is task
arithmetic at 0.3 up to SVD round-off. Differences from the official recipe: docs/fidelity.md.

The SVD of the masked task vectors is computed once per pool and cached on disk: ``s`` and the
singular vectors of the short side only (``V`` of a tall matrix, ``U`` of a wide one, ``r x r`` per
task); the other factor times ``s`` is ``tau V`` (or ``U^T tau``), one product per matrix at load.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm import tqdm

from ..engine import svd as svd_step
from ..engine.merged_model import Granularity, MergedModel, _Merge
from ..engine.task_vectors import TaskVectors
from ..io.cache import default_cache_dir
from ..io.checkpoints import CheckpointError, load_state_dict, save_state_dict
from ..models.layout import Layout
from ..models.pool import ModelPool
from .adamerging import OBJECTIVES, AdaMerging
from .parts import MethodParts

MASK_LOGITS_KEY = "merged.mask_logits"
MASKED = ("attn_mlp", "all_2d")
MASK_INIT = 0.1  # |initial logit| (official adaptive.py L199-208): kept +0.1, pruned -0.1
# A cached SVD is used only if ||tau_k v_kj|| matches s_kj to this fraction of max_j s_kj.
SVD_CHECK_TOL = 1e-3


class Subspace(NamedTuple):
    """The thin SVD ``tau_k = U_k diag(s_k) V_k^T`` of one parameter's K task vectors (``[K, m, n]``,
    ``r = min(m, n)``), as two factors with ``tau_k = left[k] @ right[k]``.

    Attributes:
        left: ``[K, m, r]``: ``U diag(s)`` when ``m >= n``, else ``U``.
        s: ``[K, r]`` singular values, descending, float32.
        right: ``[K, r, n]``: ``V^T`` when ``m >= n``, else ``diag(s) V^T``.
    """

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor


# ------------------------------------------------------------------------ what is masked
def _in_block(name: str) -> bool:
    """Whether a parameter lives in a transformer block (timm / suite ``blocks.N``, open_clip
    ``resblocks.N``)."""
    return name.startswith("blocks.") or ".blocks." in name or "resblocks" in name


def masked_names(task_vectors: TaskVectors, masked: str = "attn_mlp", layout: Layout | None = None) -> list[str]:
    """The parameters whose task vectors get masks over their singular components, in order.

    ``attn_mlp`` (the official choice): 2-D task vectors whose name contains ``attn`` or ``mlp``
    (open_clip's ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
    ``mlp.c_proj.weight``); when no name matches (encoders that name them otherwise, e.g. the
    suites' ``blocks.N.qkv`` / ``proj`` / ``fc1`` / ``fc2``), every 2-D task vector inside a
    transformer block. With the pool's ``layout`` (:class:`~adamerge.models.layout.Layout`),
    ``attn_mlp`` is its attention and MLP matrices when it names any. ``all_2d``: every 2-D task
    vector.
    """
    if masked not in MASKED:
        raise ValueError(f"masked must be one of {', '.join(MASKED)}, got {masked!r}")
    two_d = [n for n, t in zip(task_vectors.names, task_vectors.tensors) if t.dim() == 3]
    if masked == "all_2d":
        chosen = two_d
    else:
        declared = set(layout.matrices()) if layout is not None else set()
        chosen = ([n for n in two_d if n in declared] or [n for n in two_d if "attn" in n or "mlp" in n]
                  or [n for n in two_d if _in_block(n)])
    if not chosen:
        raise ValueError(f"masked={masked!r} selects no parameter: no 2-D task vector "
                         f"{'named *attn* / *mlp* or inside a block ' if masked == 'attn_mlp' else ''}"
                         f"among {task_vectors.num_params} (2-D ones: {two_d[:4]})")
    return chosen


# ------------------------------------------------------------------------ SVD and its cache
def svd_cache_path(task_vectors: TaskVectors, names: list[str], cache_dir: str | Path | None = None) -> Path:
    """The cache file of the SVD of ``names``: keyed by the pool fingerprint, the masked names and
    their storage dtypes (``cache_dir`` default: ``default_cache_dir() / "svd"``)."""
    dtypes = {n: str(t.dtype) for n, t in zip(task_vectors.names, task_vectors.tensors) if n in set(names)}
    key = json.dumps({"fingerprint": task_vectors.fingerprint(), "masked": list(names), "dtypes": dtypes},
                     sort_keys=True)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "svd"
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


def _short_side(tau: torch.Tensor) -> torch.Size:
    """The shape of the singular vectors the cache keeps for ``tau`` ``[K, m, n]``: ``V^T``
    ``[K, n, n]`` of a tall matrix, ``U`` ``[K, m, m]`` of a wide one."""
    k, m, n = tau.shape
    return torch.Size((k, min(m, n), n) if m >= n else (k, m, m))


def _subspace(tau: torch.Tensor, s: torch.Tensor, basis: torch.Tensor) -> Subspace | None:
    """The :class:`Subspace` of ``tau`` from its singular values and short-side singular vectors;
    ``None`` when they do not belong to ``tau`` (a stale or foreign cache: the rank-1 factors
    rebuilt from ``tau`` must have the norms ``s``)."""
    work, basis = tau.float(), basis.float()
    if s.shape != (work.shape[0], min(work.shape[1:])) or basis.shape != _short_side(work):
        return None
    if work.shape[1] >= work.shape[2]:  # basis = V^T: tau V = U diag(s), exact for the thin SVD
        left, right = work @ basis.mT, basis
        norms = left.norm(dim=1)
    else:  # basis = U: U^T tau = diag(s) V^T
        left, right = basis, basis.mT @ work
        norms = right.norm(dim=2)
    gap = (norms - s).abs().amax(dim=1)
    if bool((gap > SVD_CHECK_TOL * s.amax(dim=1).clamp_min(1e-30)).any()):
        return None
    return Subspace(left.to(tau.dtype), s.float(), right.to(tau.dtype))


def _read_svd_cache(path: Path, task_vectors: TaskVectors, names: list[str]) -> dict[str, Subspace] | None:
    """The cached subspaces of ``names``, or ``None`` when the file is unreadable or stale."""
    try:
        stored = load_state_dict(path)
    except CheckpointError:
        return None
    tensors = dict(zip(task_vectors.names, task_vectors.tensors))
    out = {}
    for n in names:
        if f"{n}.s" not in stored or f"{n}.basis" not in stored:
            return None
        sub = _subspace(tensors[n], stored[f"{n}.s"], stored[f"{n}.basis"])
        if sub is None:
            return None
        out[n] = sub
    return out


def svd_subspaces(task_vectors: TaskVectors, names: list[str],
                  cache_dir: str | Path | None = None) -> dict[str, Subspace]:
    """The thin SVD (``torch.linalg.svd``, float32; float64 when float32 does not converge, see
    :func:`adamerge.engine.svd.svd`) of each named parameter's K task vectors.

    Read from the cache file of :func:`svd_cache_path` when it holds them (and they match the
    task vectors); otherwise computed, one batched SVD per parameter, and written there
    atomically (a temporary file renamed into place), so concurrent runs never see half a file.
    """
    path = svd_cache_path(task_vectors, names, cache_dir)
    if path.is_file():
        cached = _read_svd_cache(path, task_vectors, names)
        if cached is not None:
            return cached
        rank_zero_info(f"adamerge: SVD cache {path} does not match these task vectors; recomputing")
    tensors = dict(zip(task_vectors.names, task_vectors.tensors))
    start = time.perf_counter()
    stored, out = {}, {}
    for n in tqdm(names, desc="AdaRank: SVD of the task vectors", disable=None, leave=False):
        tau = tensors[n]
        u, s, vh = svd_step.svd(tau.float(), n)  # batched over the K tasks
        basis = vh if tau.shape[1] >= tau.shape[2] else u
        stored[f"{n}.s"], stored[f"{n}.basis"] = s.cpu(), basis.cpu()
        sub = _subspace(tau, s, basis)  # the same tensors as a later read of the cache
        if sub is None:
            raise ValueError(f"the SVD of task vectors {n!r} {tuple(tau.shape)} does not reproduce "
                             "their singular values (non-finite entries?)")
        out[n] = sub
    save_state_dict(stored, path, metadata={"names": json.dumps(names)})
    rank_zero_info(f"adamerge: SVD of {len(names)} task-vector matrices x {task_vectors.num_tasks} "
                   f"tasks in {time.perf_counter() - start:.1f} s, cached at {path} "
                   f"({path.stat().st_size / 2**20:.1f} MiB)")
    return out


# ------------------------------------------------------------------------ the masked merge
def straight_through(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """``1[sigmoid(z / T) > 0.5]`` in the forward, the gradient of ``sigmoid(z / T)`` backward."""
    soft = torch.sigmoid(logits / temp)
    return soft + ((soft > 0.5).to(soft.dtype) - soft).detach()


def subspace_merge(base: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """``base + left @ diag(scale) @ right`` (``[m, n]``, ``[m, R]``, ``[R, n]``, ``[R]``) as one
    GEMM; the scale goes on the smaller factor."""
    scale = scale.to(left.dtype)
    if left.shape[0] <= right.shape[1]:
        a, b = left * scale, right
    else:
        a, b = left, scale[:, None] * right
    if a.dtype == base.dtype:
        return torch.addmm(base, a, b)
    return base + (a @ b).to(base.dtype)  # low-precision storage: product there, add in the base dtype


class SubspaceMaskedModel(MergedModel):
    """A :class:`MergedModel` whose named matrices merge masked singular components.

    Masked parameter ``l``: ``base + sum_k lambda[l, k] * left_kl diag(h(z_kl)) right_kl``; the others as
    in :class:`MergedModel` (the fused merge). The factors are plain tensors moved with the module,
    not state: a checkpoint keeps only ``coefficients`` and ``mask_logits``.

    Args:
        module, task_vectors, granularity, prior, clamp, offload: as in :class:`MergedModel`.
        subspaces: parameter name -> its :class:`Subspace` (see :func:`svd_subspaces`).
        initial_rank_ratio: fraction of each matrix's components kept at the start (the leading
            ``int(r * ratio)``, by singular value); 1.0 keeps all.
        mask_temp: temperature ``T`` of the mask's sigmoid (the official 10).

    Attributes:
        mask_logits: ``[K, sum_l r_l]``, the logits of every masked matrix side by side
            (:attr:`offsets` gives where each starts, :attr:`ranks` its ``r``).
    """

    def __init__(self, module: nn.Module, task_vectors: TaskVectors, subspaces: Mapping[str, Subspace],
                 initial_rank_ratio: float = 1.0, mask_temp: float = 10.0,
                 granularity: Granularity = "layerwise", prior: float = 0.3, clamp: bool = False,
                 offload: bool = False) -> None:
        super().__init__(module, task_vectors, granularity=granularity, prior=prior, clamp=clamp,
                         offload=offload)
        check_mask_options(initial_rank_ratio, mask_temp)
        index = {n: p for p, n in enumerate(task_vectors.names)}
        unknown = [n for n in subspaces if n not in index]
        if unknown:
            raise ValueError(f"subspaces for parameters without task vectors: {unknown[:4]}")
        if not subspaces:
            raise ValueError("no parameter to mask: subspaces is empty")
        self.mask_temp = float(mask_temp)
        self.masked = [n for n in task_vectors.names if n in subspaces]
        self.plain = [n for n in task_vectors.names if n not in subspaces]
        self._index = index
        self._row = {n: int(self.rows[index[n]]) for n in self.masked}
        self.register_buffer("plain_rows", self.rows[[index[n] for n in self.plain]], persistent=False)
        k = task_vectors.num_tasks
        self.ranks: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> ([m, K*r], [K*r, n])
        total = 0
        for n in self.masked:
            sub, shape = subspaces[n], tuple(task_vectors.tensors[index[n]].shape)
            r = sub.s.shape[-1]
            want = {"left": (k, shape[1], r), "s": (k, r), "right": (k, r, shape[2])}
            for part, size in want.items():
                found = tuple(getattr(sub, part).shape)
                if found != size:
                    raise ValueError(f"subspace of {n!r}: {part} has shape {found}, expected {size} "
                                     f"for task vectors {shape}")
            # [m, K*r] x [K*r, n]: the K tasks' components side by side, so the merge is one GEMM
            self._factors[n] = (sub.left.permute(1, 0, 2).reshape(shape[1], k * r),
                                sub.right.reshape(k * r, shape[2]))
            self.ranks[n], self.offsets[n] = r, total
            total += r
        logits = torch.full((k, total), MASK_INIT)
        for n, r in self.ranks.items():
            logits[:, self.offsets[n] + int(r * initial_rank_ratio): self.offsets[n] + r] = -MASK_INIT
        self.mask_logits = nn.Parameter(logits)

    def _apply(self, fn, recurse: bool = True):  # the factors travel with the module, like the task vectors
        super()._apply(fn, recurse)
        self._factors = {n: (fn(a), fn(b)) for n, (a, b) in self._factors.items()}
        return self

    def kept(self) -> torch.Tensor:
        """``[K, sum_l r_l]`` booleans: the components the forward keeps now."""
        return torch.sigmoid(self.mask_logits.detach() / self.mask_temp) > 0.5

    def kept_fraction(self) -> torch.Tensor:
        """The fraction of all masked components that are kept (a scalar tensor)."""
        return self.kept().float().mean()

    def mask_table(self) -> dict[str, dict[str, int]]:
        """Per masked parameter, per task: how many of its ``r`` singular components are kept."""
        kept = self.kept()
        return {n: {t: int(kept[k, self.offsets[n]: self.offsets[n] + r].sum())
                    for k, t in enumerate(self.task_names)}
                for n, r in self.ranks.items()}

    def merged_parameters(self, reuse_buffers: bool = False) -> dict[str, torch.Tensor]:
        """Merged tensors, differentiable w.r.t. the coefficients and the mask logits.

        ``reuse_buffers`` applies to the unmasked parameters (see :meth:`MergedModel.merged_parameters`);
        the masked ones are new tensors at every call. Without gradients (evaluation, export, a
        fixed merge) the mask is fixed: :meth:`fixed_mask_parameters`, the cheaper product.
        """
        if not torch.is_grad_enabled():
            return self.fixed_mask_parameters()
        params = dict(self.module.named_parameters())
        lam = self.lambdas()
        out: dict[str, torch.Tensor] = {}
        if self.plain:
            bases = tuple(params[n] for n in self.plain)
            outs = self._step_buffers(bases) if reuse_buffers else None
            taus = tuple(self.task_vectors.tensors[self._index[n]] for n in self.plain)
            out.update(zip(self.plain, _Merge.apply(lam, self.plain_rows, bases, taus, outs)))
        hard = straight_through(self.mask_logits, self.mask_temp)
        for n, (left, right) in self._factors.items():
            off, r = self.offsets[n], self.ranks[n]
            scale = lam[self._row[n]].to(hard.dtype)[:, None] * hard[:, off: off + r]  # [K, r]
            out[n] = subspace_merge(params[n], left, right, scale.reshape(-1))
        return {n: out[n] for n in self.task_vectors.names}

    @torch.no_grad()
    def fixed_mask_parameters(self) -> dict[str, torch.Tensor]:
        """The merge with the mask as it stands, at the cost of the smaller of its kept and its
        pruned components.

        The training forward multiplies every component, ``2 m n K r`` operations per ``m x n``
        matrix (``K r`` = all tasks' components), because the mask's gradient needs them all. With
        a fixed mask a matrix is either ``base + sum`` of its kept components (fewer kept than
        pruned) or the dense layer-wise merge ``base + sum_k lambda_k tau_k`` minus its pruned
        components: ``2 m n min(kept, pruned)``, and nothing but the fused merge when every
        component is kept. Equal to the training forward up to the SVD's round-off.
        """
        params = dict(self.module.named_parameters())
        lam = self.lambdas()
        kept = self.kept()
        k = self.task_vectors.num_tasks
        keeps = {n: kept[:, self.offsets[n]: self.offsets[n] + r].reshape(-1) for n, r in self.ranks.items()}
        from_kept = {n for n, keep in keeps.items() if int(keep.sum()) <= keep.numel() // 2}
        # the fused merge for the unmasked tensors and the matrices merged as dense minus pruned
        dense = [n for n in self.task_vectors.names if n not in from_kept]
        at = [self._index[n] for n in dense]
        out = dict(zip(dense, _Merge.apply(lam, self.rows[at], tuple(params[n] for n in dense),
                                           tuple(self.task_vectors.tensors[p] for p in at), None)))
        for n, (left, right) in self._factors.items():
            scale = lam[self._row[n]][:, None].expand(k, self.ranks[n]).reshape(-1).float()
            if n in from_kept:
                idx = keeps[n].nonzero().squeeze(1)
                out[n] = subspace_merge(params[n], left[:, idx], right[idx], scale[idx])
            else:
                idx = (~keeps[n]).nonzero().squeeze(1)
                out[n] = subspace_merge(out[n], left[:, idx], right[idx], -scale[idx])
        return {n: out[n] for n in self.task_vectors.names}


def check_mask_options(initial_rank_ratio: float, mask_temp: float) -> None:
    """One-line errors for mask settings out of range."""
    if not 0.0 < initial_rank_ratio <= 1.0:
        raise ValueError(f"initial_rank_ratio must be in (0, 1], got {initial_rank_ratio} (the "
                         "official 0 means 1/K: pass that value)")
    if not mask_temp > 0:
        raise ValueError(f"mask_temp must be > 0, got {mask_temp}")


# ------------------------------------------------------------------------ the method
class AdaRank(AdaMerging):
    """AdaRank: layer-wise coefficients and straight-through masks over the singular components
    of the attention / MLP task vectors, learned jointly by entropy (TA variant: base = pretrained).

    Args:
        initial_rank_ratio: fraction of each masked matrix's components kept at step 0 (the
            leading ones); 1.0 (the official TA setting) keeps all, so step 0 is task arithmetic.
        mask_temp: temperature of the masks' sigmoid (the official 10).
        masked: which task vectors get masks: ``attn_mlp`` (2-D attention / MLP weights of the
            transformer blocks; see :func:`masked_names`) or ``all_2d`` (every 2-D task vector).
        granularity, prior, lr, per_task_backward, task_vector_dtype, init_from: as in
            :class:`~adamerge.methods.AdaMerging` (layer-wise, 0.3, Adam 1e-3 as the official).
        clamp: clamp the coefficients to [0, 1]; off, as the official ``clamp_weights: false``
            (AdaMerging's default is on).
        learn_coefficients: train the coefficients with the masks (``False``: masks only, the
            coefficients stay at ``prior`` or ``init_from``'s values).
        cache_dir: folder of the cached SVDs (default ``$ADAMERGE_CACHE/svd``, see
            :func:`adamerge.io.cache.default_cache_dir`).
    """

    method = "adarank"

    def __init__(self, pool: ModelPool, initial_rank_ratio: float = 1.0, mask_temp: float = 10.0,
                 masked: Literal["attn_mlp", "all_2d"] = "attn_mlp", granularity: Granularity = "layerwise",
                 prior: float = 0.3, clamp: bool = False, lr: float = 1e-3, learn_coefficients: bool = True,
                 init_from: str | None = None, per_task_backward: bool = False,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 cache_dir: str | None = None) -> None:
        check_mask_options(initial_rank_ratio, mask_temp)  # before the pool is loaded
        if masked not in MASKED:
            raise ValueError(f"masked must be one of {', '.join(MASKED)}, got {masked!r}")
        # a str, not a Path: the hyper-parameters saved into checkpoints must stay plain data
        cache_dir = None if cache_dir is None else str(cache_dir)

        def merge(encoder: nn.Module, task_vectors: TaskVectors, layout: Layout | None = None,
                  **options: Any) -> SubspaceMaskedModel:
            subspaces = svd_subspaces(task_vectors, masked_names(task_vectors, masked, layout), cache_dir)
            return SubspaceMaskedModel(encoder, task_vectors, subspaces, mask_temp=mask_temp,
                                       initial_rank_ratio=initial_rank_ratio, **options)
        super().__init__(pool, granularity=granularity, prior=prior, clamp=clamp, lr=lr,
                         per_task_backward=per_task_backward, task_vector_dtype=task_vector_dtype,
                         learn_coefficients=learn_coefficients, init_from=init_from,
                         _parts=MethodParts(OBJECTIVES["entropy"], merge=merge))

    def extra_learned_state(self) -> dict[str, torch.Tensor]:
        return {MASK_LOGITS_KEY: self.merged.mask_logits}

    @property
    def trains_merge(self) -> bool:
        return True  # the masks always train, even with fixed coefficients

    def _log_train(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        super()._log_train(loss, losses)
        if self.logs_this_step():  # False without a trainer (online)
            self.log("mask/kept", self.merged.kept_fraction())
