"""Low-rank (LoRA) task vectors and their fused merge: ``W_p = W0_p + sum_k lambda_k s_k B_k A_k``.

Expert k changes a weight ``W`` (``[out, in]``) by ``scale_k * B_k @ A_k`` (``B_k`` ``[out, r_k]``,
``A_k`` ``[r_k, in]``, ``scale_k = lora_alpha / r`` as PEFT defines it). K dense task vectors of a
large model do not fit in memory, K adapters do. Per parameter the K adapters are concatenated
along the rank (``B_p = [B_1 | ... | B_K]``, ``A_p`` stacked likewise), so the whole merge of one
parameter is ONE GEMM, ``W0 + (B_p diag(s_p)) @ A_p`` with ``s_p`` the coefficient times the scale
of each adapter repeated over its rank; no dense delta is ever materialised. Its backward is one
GEMM too (see :class:`_LowRankMerge`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .merged_model import Granularity, MergedModel
from .task_vectors import TaskVectors

# One LoRA adapter of one weight: (B [out, r], A [r, in], scale).
Adapter = tuple[torch.Tensor, torch.Tensor, float]

# Values per adapter tensor hashed by fingerprint() (evenly spaced over the flat tensor).
FINGERPRINT_SAMPLES = 8


@dataclass
class LowRankTaskVectors:
    """K LoRA task vectors over P two-dimensional parameters, concatenated along the rank.

    Attributes:
        task_names: the K tasks, in coefficient-column order.
        names: the P merged parameter names (2-D weights ``[out_p, in_p]``), in coefficient-row order.
        b: P tensors, ``b[p]`` ``[out_p, R_p]``: the K ``B`` factors side by side (``R_p`` the sum of
            the ranks at parameter p).
        a: P tensors, ``a[p]`` ``[R_p, in_p]``: the K ``A`` factors stacked in the same order.
        ranks: ``ranks[p][k]``, the rank of task k at parameter p (0: the adapter leaves it alone).
        scales: ``[P, K]`` float32, the LoRA scaling of task k at parameter p. It is applied at merge
            time, never folded into ``b``, so coefficients and adapters stay separate.
    """

    task_names: list[str]
    names: list[str]
    b: list[torch.Tensor]
    a: list[torch.Tensor]
    ranks: list[list[int]]
    scales: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k, n = len(self.task_names), len(self.names)
        if len(set(self.task_names)) != k:
            raise ValueError(f"task names must be unique, got {self.task_names}")
        if len(set(self.names)) != n:
            raise ValueError(f"parameter names must be unique, got {self.names}")
        if not len(self.b) == len(self.a) == len(self.ranks) == n:
            raise ValueError(f"{n} names for {len(self.b)} b, {len(self.a)} a and "
                             f"{len(self.ranks)} rank lists")
        self.scales = torch.as_tensor(self.scales, dtype=torch.float32)
        if tuple(self.scales.shape) != (n, k):
            raise ValueError(f"scales have shape {tuple(self.scales.shape)}, expected {(n, k)} "
                             "(parameters, tasks)")
        for name, b, a, ranks in zip(self.names, self.b, self.a, self.ranks):
            if b.dim() != 2 or a.dim() != 2:
                raise ValueError(f"adapter {name!r}: b and a must be 2-D, got shapes "
                                 f"{tuple(b.shape)} and {tuple(a.shape)}")
            if len(ranks) != k or any(r < 0 for r in ranks):
                raise ValueError(f"adapter {name!r}: ranks {list(ranks)} must be {k} values >= 0")
            if not b.shape[1] == a.shape[0] == sum(ranks):
                raise ValueError(f"adapter {name!r}: b {tuple(b.shape)} and a {tuple(a.shape)} do "
                                 f"not match ranks {list(ranks)} (total {sum(ranks)})")
            if b.device != a.device:
                raise ValueError(f"adapter {name!r}: b is on {b.device}, a on {a.device}")

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, Mapping[str, Adapter]],
                      task_names: Sequence[str] | None = None) -> "LowRankTaskVectors":
        """Concatenate per-task LoRA factors.

        Args:
            adapters: task name -> {parameter name -> ``(B [out, r], A [r, in], scale)``}. A task
                without an entry for a parameter gets rank 0 (and scale 0) there.
            task_names: column order of the tasks (the same set as ``adapters``); default the
                mapping's order.

        Parameters are ordered by the sorted union of the names of all tasks. Factors of one
        parameter are concatenated in their promoted dtype.
        """
        if not adapters:
            raise ValueError("at least one adapter is needed, got none")
        tasks = list(adapters) if task_names is None else list(task_names)
        if sorted(tasks) != sorted(adapters):
            raise ValueError(f"task_names {tasks} are not the adapters' tasks {list(adapters)}")
        names = sorted({n for t in tasks for n in adapters[t]})
        bs, as_, all_ranks = [], [], []
        scales = torch.zeros(len(names), len(tasks), dtype=torch.float32)
        for p, name in enumerate(names):
            present = [(k, adapters[t][name]) for k, t in enumerate(tasks) if name in adapters[t]]
            shape = (present[0][1][0].shape[0], present[0][1][1].shape[-1])
            ranks = [0] * len(tasks)
            for k, (b, a, scale) in present:
                if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                    raise ValueError(f"adapter {name!r} of task {tasks[k]!r}: B {tuple(b.shape)} and "
                                     f"A {tuple(a.shape)} are not [out, r] and [r, in]")
                if (b.shape[0], a.shape[1]) != shape:
                    raise ValueError(f"adapter {name!r} of task {tasks[k]!r} has shape "
                                     f"{(b.shape[0], a.shape[1])}, other tasks have {shape}")
                ranks[k] = b.shape[1]
                scales[p, k] = float(scale)
            dtype = present[0][1][0].dtype
            for _, (b, a, _) in present:
                dtype = torch.promote_types(torch.promote_types(dtype, b.dtype), a.dtype)
            bs.append(torch.cat([b.detach().to(dtype) for _, (b, _, _) in present], dim=1))
            as_.append(torch.cat([a.detach().to(dtype) for _, (_, a, _) in present], dim=0))
            all_ranks.append(ranks)
        return cls(task_names=tasks, names=names, b=bs, a=as_, ranks=all_ranks, scales=scales)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_params(self) -> int:
        return len(self.names)

    def shape(self, p: int) -> tuple[int, int]:
        """``(out, in)`` of parameter p."""
        return self.b[p].shape[0], self.a[p].shape[1]

    def nbytes(self) -> int:
        """Bytes held by the factors and the scales."""
        return (sum(t.numel() * t.element_size() for t in (*self.b, *self.a))
                + self.scales.numel() * self.scales.element_size())

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "LowRankTaskVectors":
        """A copy on another device and/or storage dtype of the factors (scales stay float32)."""
        return LowRankTaskVectors(list(self.task_names), list(self.names),
                                  [t.to(device=device, dtype=dtype) for t in self.b],
                                  [t.to(device=device, dtype=dtype) for t in self.a],
                                  [list(r) for r in self.ranks], self.scales.to(device=device),
                                  dict(self.meta))

    def segments(self) -> list[torch.Tensor]:
        """Per parameter the task of each rank row (``[R_p]`` long, on the factors' device)."""
        return [torch.repeat_interleave(torch.arange(self.num_tasks, device=b.device),
                                        torch.tensor(r, device=b.device), output_size=b.shape[1])
                for b, r in zip(self.b, self.ranks)]

    def _span(self, p: int, k: int) -> slice:
        start = sum(self.ranks[p][:k])
        return slice(start, start + self.ranks[p][k])

    def delta(self, p: int, k: int | str) -> torch.Tensor:
        """``scale * B_k @ A_k`` of parameter p and task k, in float32 or wider (for tests, export)."""
        k = self.task_names.index(k) if isinstance(k, str) else k
        span = self._span(p, k)
        work = torch.promote_types(self.b[p].dtype, torch.float32)
        b, a = self.b[p][:, span].to(work), self.a[p][span].to(work)
        return (b @ a) * float(self.scales[p, k])

    def to_dense(self, dtype: torch.dtype | None = None) -> TaskVectors:
        """The dense task vectors ``[K, out, in]`` per parameter (default dtype: the factors').

        Materialises K full-size deltas per parameter: for tests and small models only. One GEMM
        per parameter: row block k of the left factor is ``B_p`` masked to task k's rank columns
        and scaled (K times the necessary flops, but one call instead of K).
        """
        k_tasks, tensors = self.num_tasks, []
        for p, seg in enumerate(self.segments()):
            (out_f, in_f), work = self.shape(p), torch.promote_types(self.b[p].dtype, torch.float32)
            b, a = self.b[p].to(work), self.a[p].to(work)
            mask = (seg[None, :] == torch.arange(k_tasks, device=seg.device)[:, None]).to(work)
            mask *= self.scales[p].to(device=b.device, dtype=work)[:, None]  # [K, R]
            left = (b[None] * mask[:, None, :]).reshape(k_tasks * out_f, -1)
            tensors.append((left @ a).view(k_tasks, out_f, in_f).to(dtype or self.b[p].dtype))
        return TaskVectors(list(self.task_names), list(self.names), tensors, dict(self.meta))

    def _norms(self) -> list[list[float]]:
        """Frobenius norm of every dense delta, ``[K][P]``, without forming it.

        ``||B A||_F^2 = sum((B^T B) * (A A^T))``: two ``[r, r]`` Gram matrices per adapter.
        """
        norms = [[0.0] * self.num_params for _ in range(self.num_tasks)]
        for p in range(self.num_params):
            for k in range(self.num_tasks):
                span = self._span(p, k)
                b, a = self.b[p][:, span].double(), self.a[p][span].double()
                sq = float(((b.t() @ b) * (a @ a.t())).sum())
                norms[k][p] = abs(float(self.scales[p, k])) * max(sq, 0.0) ** 0.5
        return norms

    def fingerprint(self) -> dict:
        """Names, shapes, task order and a content hash, like :meth:`TaskVectors.fingerprint`.

        The same keys (``tasks``, ``params``, ``task_norms``, ``hash``, optional ``transform``),
        and ``task_norms`` are the norms of the dense deltas, so checkpoint checks read alike. The
        hash covers those norms, the ranks, the scales and a deterministic sample of factor values,
        all as 4 significant digits: stable across devices and summation orders.
        """
        norms = self._norms()

        def sample(t: torch.Tensor) -> list[str]:
            flat = t.reshape(-1)
            if flat.numel() == 0:
                return []
            idx = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES).long().unique()
            return [f"{x:.4g}" for x in flat[idx.to(flat.device)].double().tolist()]

        content = {
            "names": list(self.names),
            "shapes": [list(self.shape(p)) for p in range(self.num_params)],
            "ranks": [list(r) for r in self.ranks],
            "scales": [[f"{x:.4g}" for x in row] for row in self.scales.double().tolist()],
            "norms": [[f"{x:.4g}" for x in row] for row in norms],
            "samples": [sample(b) + sample(a) for b, a in zip(self.b, self.a)],
        }
        digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
        return {
            "tasks": list(self.task_names),
            "params": {n: list(self.shape(p)) for p, n in enumerate(self.names)},
            "task_norms": {task: f"{sum(x * x for x in row) ** 0.5:.4g}"
                           for task, row in zip(self.task_names, norms)},
            "hash": digest,
            **({"transform": self.meta["transform"]} if "transform" in self.meta else {}),
        }


def _local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` on the device and in the dtype of ``like`` (adapters may be offloaded or bfloat16)."""
    return t.to(device=like.device, dtype=like.dtype, non_blocking=True)


class _LowRankMerge(torch.autograd.Function):
    """Fused low-rank merge of all parameters; the only differentiable input is the coefficients.

    Forward, per parameter: ``W = W0 + (B * s) @ A`` with ``s[i] = lambda[row, k(i)] * scale[k(i)]``
    (``k(i)`` the task of rank row i): one ``addmm``, into ``outs[p]`` when given. ``s`` scales
    whichever factor is smaller (``B`` when ``out <= in``), the GEMM is the same either way.

    Backward: ``dL/dlambda[row, k] = scale_k * sum_{i in k} sum((B^T G) * A)[i]``. ``B^T G``
    (``[R, in]``) and ``G A^T`` (``[out, R]``) cost the same GEMM; the one with the smaller
    intermediate is used (``B^T G`` when ``in <= out``). The per-rank sums are reduced to tasks by
    ``index_add_`` over the precomputed segment index. Everything runs in the base dtype; adapters
    are converted (and streamed, if offloaded) per parameter, in forward and again in backward, so
    no converted copy outlives its use.
    """

    @staticmethod
    def forward(ctx: Any, coeffs: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor,
                bases: tuple[torch.Tensor, ...], bs: tuple[torch.Tensor, ...],
                as_: tuple[torch.Tensor, ...], segments: tuple[torch.Tensor, ...],
                outs: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        ctx.bs, ctx.as_, ctx.segments, ctx.scales, ctx.rows = bs, as_, segments, scales, rows
        ctx.coeff_shape, ctx.coeff_dtype = coeffs.shape, coeffs.dtype
        scaled = coeffs[rows] * scales.to(coeffs.device)  # [P, K]: lambda[row(p), k] * scale[p, k]
        results = []
        for p, (base, b, a, seg) in enumerate(zip(bases, bs, as_, segments)):
            b, a = _local(b, base), _local(a, base)
            s = scaled[p][seg.to(scaled.device)].to(device=base.device, dtype=base.dtype)  # [R]
            if b.shape[0] <= a.shape[1]:
                left, right = b * s, a
            else:
                left, right = b, a * s[:, None]
            if outs is None:
                results.append(torch.addmm(base, left, right))
            else:
                results.append(torch.addmm(base, left, right, out=outs[p].view(base.shape)))
        return tuple(results)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        per_param, used_rows = [], []
        for p, g in enumerate(grads):
            if g is None:
                continue
            b, a = _local(ctx.bs[p], g), _local(ctx.as_[p], g)
            if a.shape[1] <= b.shape[0]:  # in <= out: the [R, in] intermediate is the smaller
                per_rank = torch.mm(b.t(), g).mul_(a).sum(1)
            else:
                per_rank = torch.mm(g, a.t()).mul_(b).sum(0)
            per_task = torch.zeros(ctx.coeff_shape[1], dtype=ctx.coeff_dtype, device=g.device)
            per_task.index_add_(0, ctx.segments[p].to(g.device), per_rank.to(ctx.coeff_dtype))
            per_param.append(per_task * ctx.scales[p].to(per_task.device))
            used_rows.append(p)
        grad = torch.zeros(ctx.coeff_shape, dtype=ctx.coeff_dtype, device=ctx.rows.device)
        if per_param:
            index = ctx.rows[torch.tensor(used_rows, device=ctx.rows.device)]
            grad.index_add_(0, index, torch.stack(per_param).to(grad.device))
        return grad, None, None, None, None, None, None, None


class LowRankMergedModel(MergedModel):
    """A :class:`MergedModel` whose task vectors are LoRA adapters, merged without dense deltas.

    Same interface and arguments as :class:`MergedModel`, with ``task_vectors`` a
    :class:`LowRankTaskVectors`; every name must be a 2-D parameter ``[out, in]`` of ``module``.
    ``offload`` keeps the adapters where they are and streams them at each merge.
    """

    task_vectors: LowRankTaskVectors

    def __init__(self, module: nn.Module, task_vectors: LowRankTaskVectors,
                 granularity: Granularity = "layerwise", prior: float = 0.3, clamp: bool = True,
                 offload: bool = False) -> None:
        super().__init__(module, task_vectors,  # type: ignore[arg-type]
                         granularity, prior, clamp, offload)
        self._segments = self.task_vectors.segments()

    def _adopt(self, module: nn.Module,  # type: ignore[override]
               task_vectors: LowRankTaskVectors) -> LowRankTaskVectors:
        """Check every adapter against its 2-D parameter of ``module``; return a shallow copy."""
        if not isinstance(task_vectors, LowRankTaskVectors):
            raise TypeError("task_vectors must be LowRankTaskVectors, got "
                            f"{type(task_vectors).__name__}")
        params = dict(module.named_parameters())
        for p, name in enumerate(task_vectors.names):
            if name not in params:
                raise ValueError(f"adapter {name!r} is not a parameter of {type(module).__name__}")
            if tuple(params[name].shape) != tuple(task_vectors.shape(p)):
                raise ValueError(f"adapter {name!r} has shape {tuple(task_vectors.shape(p))}, the "
                                 f"parameter has {tuple(params[name].shape)}")
        tv = task_vectors
        return LowRankTaskVectors(list(tv.task_names), list(tv.names), list(tv.b), list(tv.a),
                                  [list(r) for r in tv.ranks], tv.scales, dict(tv.meta))

    def _apply(self, fn, recurse: bool = True):  # keep the adapters next to the module
        nn.Module._apply(self, fn, recurse)
        if not self.offload:
            tv = self.task_vectors
            tv.b = [fn(t) for t in tv.b]
            tv.a = [fn(t) for t in tv.a]
            device = fn(tv.scales).device  # scales and segments follow the device, not the dtype
            tv.scales = tv.scales.to(device)
            self._segments = [s.to(device) for s in self._segments]
        return self

    def merged_parameters(self, reuse_buffers: bool = False) -> dict[str, torch.Tensor]:
        """Merged weights, differentiable w.r.t. the coefficients (as in :class:`MergedModel`)."""
        params = dict(self.module.named_parameters())
        tv = self.task_vectors
        bases = tuple(params[n] for n in tv.names)
        outs = self._step_buffers(bases) if reuse_buffers else None
        merged = _LowRankMerge.apply(self.lambdas(), self.rows, tv.scales, bases, tuple(tv.b),
                                     tuple(tv.a), tuple(self._segments), outs)
        return dict(zip(tv.names, merged))
