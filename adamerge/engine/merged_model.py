"""The merged functional model: ``theta_p = base_p + sum_k lambda[row(p), k] * tau[k, p]``.

The base module is frozen and never copied or modified: it is called with
``torch.func.functional_call`` on merged tensors. The merge and its backward are one fused
autograd node (:class:`_Merge`): per parameter one matrix-vector product over the stacked task
vectors (on the CPU, large parameters as one batched product over column blocks; into reused
buffers during training); autograd records one node, not P x K, and no gradient is ever
computed for a frozen tensor. With ``split_qkv`` a fused q/k/v parameter (open_clip's
``in_proj_weight``) is merged as three slices along dim 0, each with its own coefficient row.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .task_vectors import TaskVectors

Granularity = Literal["taskwise", "layerwise"]

# Fused q/k/v parameters (``split_qkv``): q, k and v stacked along dim 0, in that order.
# nn.MultiheadAttention / open_clip: ``attn.in_proj_weight`` [3D, D], ``attn.in_proj_bias`` [3D];
# timm and the built-in suites: the ``qkv`` nn.Linear.
QKV_SUFFIXES = ("in_proj_weight", "in_proj_bias", "qkv.weight", "qkv.bias")
QKV_PARTS = ("q", "k", "v")

# Parameters of at least this many values are merged in blocks on the CPU (see _blocks).
BLOCK_MIN_NUMEL = 1 << 16
MAX_BLOCKS = 16


def _blocks(flat_tau: torch.Tensor) -> int:
    """How many equal column blocks the ``[K, N]`` task vectors of one parameter are split into.

    On the CPU a BLAS matrix-vector product runs on about one core's memory bandwidth (2 threads
    gave 4.2 ms vs 4.7 ms on one ViT-B/32 MLP weight x 8 tasks); as a batched product over column
    blocks (one small GEMM per block, spread over the threads) the same merge took 2.9 ms and its
    backward 2.3 ms instead of 3.0 ms. Small parameters and GPUs keep the single call.
    """
    n = flat_tau.shape[1]
    if flat_tau.device.type != "cpu" or n < BLOCK_MIN_NUMEL:
        return 1
    m = MAX_BLOCKS
    while n % m:
        m //= 2
    return m


def _combine(flat_base: torch.Tensor, flat_tau: torch.Tensor, lam: torch.Tensor,
             out: torch.Tensor) -> None:
    """``out = flat_base + flat_tau.T @ lam`` (``[N]``, ``[K, N]``, ``[K]``), written into ``out``."""
    m = _blocks(flat_tau)
    if m == 1:
        if flat_tau.dtype == flat_base.dtype:
            torch.addmv(flat_base, flat_tau.t(), lam, out=out)
        else:  # low-precision storage: combine in the storage dtype, add in the base dtype
            torch.add(flat_base, torch.mv(flat_tau.t(), lam), out=out)
        return
    k, n = flat_tau.shape
    blocks = flat_tau.view(k, m, n // m).transpose(0, 1)  # [m, K, C], a view: nothing is copied
    lam_b = lam.view(1, 1, k).expand(m, 1, k)
    if flat_tau.dtype == flat_base.dtype:
        torch.baddbmm(flat_base.view(m, 1, -1), lam_b, blocks, out=out.view(m, 1, -1))
    else:
        torch.add(flat_base, torch.bmm(lam_b, blocks).view(-1), out=out)


def _project(flat_tau: torch.Tensor, flat_g: torch.Tensor) -> torch.Tensor:
    """``flat_tau @ flat_g`` (``[K]``): the dot product of the gradient with each task vector."""
    m = _blocks(flat_tau)
    if m == 1:
        return torch.mv(flat_tau, flat_g)
    k, n = flat_tau.shape
    blocks = flat_tau.view(k, m, n // m).transpose(0, 1)  # [m, K, C]
    return torch.bmm(flat_g.view(m, 1, -1), blocks.transpose(1, 2)).sum(0).view(k)


def _chunk_slices(numel: int, chunks: int) -> list[slice]:
    """The ``chunks`` equal consecutive slices of a flat parameter (a chunk of dim 0 of the
    parameter is a contiguous range of its flat view)."""
    n = numel // chunks
    return [slice(j * n, (j + 1) * n) for j in range(chunks)]


class _Merge(torch.autograd.Function):
    """Fused merge of all parameters; the only differentiable input is the coefficient matrix.

    ``outs`` (optional) are reusable flat buffers, one per parameter, written in place: a training
    loop then allocates no parameter-sized tensor per step for the merge. ``chunks`` (optional,
    one count per parameter): parameter ``p`` is merged as ``chunks[p]`` equal slices along its
    dim 0, slice ``j`` with coefficient row ``rows[p] + j`` (views: nothing is copied).
    """

    @staticmethod
    def forward(ctx: Any, coeffs: torch.Tensor, rows: torch.Tensor, bases: tuple[torch.Tensor, ...],
                taus: tuple[torch.Tensor, ...], outs: tuple[torch.Tensor, ...] | None = None,
                chunks: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        ctx.taus, ctx.rows, ctx.coeff_shape = taus, rows, coeffs.shape
        results = []
        rows_list = rows.tolist()
        ctx.rows_list, ctx.chunks = rows_list, chunks
        for p, (row, base, tau) in enumerate(zip(rows_list, bases, taus)):
            flat_tau = tau.reshape(tau.shape[0], -1)
            if flat_tau.device != base.device:  # task vectors streamed from (pinned) CPU memory
                flat_tau = flat_tau.to(base.device, non_blocking=True)
            flat_base = base.reshape(-1)
            out = outs[p] if outs is not None else torch.empty_like(flat_base)
            if chunks is None or chunks[p] == 1:
                _combine(flat_base, flat_tau, coeffs[row].to(flat_tau.dtype), out)
            else:
                for j, s in enumerate(_chunk_slices(flat_base.numel(), chunks[p])):
                    _combine(flat_base[s], flat_tau[:, s], coeffs[row + j].to(flat_tau.dtype), out[s])
            results.append(out.view(base.shape))
        return tuple(results)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        # d loss / d lambda[row(p), k] = <d loss / d theta_p, tau_k,p> (per chunk: over its slice)
        per_row, used_rows = [], []
        for p, (g, tau) in enumerate(zip(grads, ctx.taus)):
            if g is None:
                continue
            flat_tau = tau.reshape(tau.shape[0], -1)
            if flat_tau.device != g.device:
                flat_tau = flat_tau.to(g.device, non_blocking=True)
            flat_g = g.reshape(-1).to(flat_tau.dtype)
            if ctx.chunks is None or ctx.chunks[p] == 1:
                per_row.append(_project(flat_tau, flat_g).float())
                used_rows.append(ctx.rows_list[p])
            else:
                for j, s in enumerate(_chunk_slices(flat_g.numel(), ctx.chunks[p])):
                    per_row.append(_project(flat_tau[:, s], flat_g[s]).float())
                    used_rows.append(ctx.rows_list[p] + j)
        grad = torch.zeros(ctx.coeff_shape, dtype=torch.float32, device=ctx.rows.device)
        if per_row:
            index = torch.tensor(used_rows, device=ctx.rows.device)
            grad.index_add_(0, index, torch.stack(per_row))
        return grad, None, None, None, None, None


def fused_qkv_chunks(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Coefficient rows per parameter under ``split_qkv``: 3 for a fused q/k/v parameter (a name
    ending in one of :data:`QKV_SUFFIXES`), 1 for every other. One-line errors for a fused name
    whose dim 0 is not a multiple of 3, and for a model with no fused q/k/v parameter."""
    chunks = []
    for name, shape in zip(names, shapes):
        fused = any(name == s or name.endswith("." + s) for s in QKV_SUFFIXES)
        if fused and (len(shape) == 0 or shape[0] % 3):
            raise ValueError(f"split_qkv: {name!r} has shape {tuple(shape)}, its dim 0 is not q, k and v "
                             "of equal size (not a multiple of 3)")
        chunks.append(3 if fused else 1)
    if 3 not in chunks:
        shown = ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"split_qkv: none of the {len(names)} merged parameters ({shown}) is a fused q/k/v "
                         f"projection (a name ending in {', '.join(QKV_SUFFIXES)}); separate q/k/v "
                         "tensors already get one row each: drop split_qkv")
    return tuple(chunks)


class MergedModel(nn.Module):
    """A frozen base module whose merged parameters are ``base + coefficients @ task vectors``.

    Args:
        module: the base (pretrained) module. It is frozen; its floating-point parameters named
            in ``task_vectors`` are replaced at call time by merged tensors, every other
            parameter and every buffer comes from it unchanged.
        task_vectors: stacked task vectors whose names are parameters of ``module``.
        granularity: ``"taskwise"`` (coefficients ``[1, K]``) or ``"layerwise"`` (``[P, K]``,
            one row per parameter tensor, as in the AdaMerging paper).
        split_qkv: layer-wise only: three rows (q, k, v) for each fused q/k/v parameter
            (:data:`QKV_SUFFIXES`, e.g. open_clip's ``attn.in_proj_weight`` / ``in_proj_bias``),
            one per equal third along dim 0, as a model with separate ``q_proj`` / ``k_proj`` /
            ``v_proj`` tensors has (Hugging Face CLIP, FusionBench). The rows of a parameter are
            consecutive, in parameter order (:meth:`row_names`); ``False`` (default): one row.
        prior: initial value of every coefficient.
        clamp: clamp the coefficients to ``[0, 1]`` when merging (gradients outside are zero).
        offload: keep the task vectors where they are (e.g. pinned CPU memory) and stream them
            to the module's device at each merge instead of moving them with ``.to()``.
    """

    def __init__(self, module: nn.Module, task_vectors: TaskVectors,
                 granularity: Granularity = "layerwise", prior: float = 0.3, clamp: bool = True,
                 offload: bool = False, split_qkv: bool = False) -> None:
        super().__init__()
        if granularity not in ("taskwise", "layerwise"):
            raise ValueError(f"granularity must be 'taskwise' or 'layerwise', got {granularity!r}")
        if split_qkv and granularity != "layerwise":
            raise ValueError(f"split_qkv needs granularity 'layerwise' (q/k/v rows per parameter), got {granularity!r}")
        self.task_vectors = self._adopt(module, task_vectors)
        module.requires_grad_(False)
        module.eval()
        self.module = module
        self.granularity = granularity
        self.clamp = clamp
        self.offload = offload
        self.split_qkv = split_qkv
        # rows per parameter (split_qkv); rows[p] is then the row of the first chunk of parameter p
        self.row_chunks: tuple[int, ...] | None = fused_qkv_chunks(
            task_vectors.names, [t.shape[1:] for t in task_vectors.tensors]) if split_qkv else None
        if self.row_chunks is not None:
            firsts = [0]
            for c in self.row_chunks[:-1]:
                firsts.append(firsts[-1] + c)
            rows, n_rows = torch.tensor(firsts, dtype=torch.long), sum(self.row_chunks)
        else:
            n_rows = task_vectors.num_params if granularity == "layerwise" else 1
            rows = torch.arange(task_vectors.num_params) if granularity == "layerwise" else \
                torch.zeros(task_vectors.num_params, dtype=torch.long)
        self.coefficients = nn.Parameter(torch.full((n_rows, task_vectors.num_tasks), float(prior)))
        self.register_buffer("rows", rows, persistent=False)
        self._merge_buffers: tuple[torch.Tensor, ...] | None = None  # reused by training merges
        self.sharded = False  # shard(): the base and task vectors live in the units of self.module

    def _adopt(self, module: nn.Module, task_vectors: TaskVectors) -> TaskVectors:
        """Check every task vector against its parameter of ``module``; return a shallow copy."""
        params = dict(module.named_parameters())
        for name, tau in zip(task_vectors.names, task_vectors.tensors):
            if name not in params:
                raise ValueError(f"task vector {name!r} is not a parameter of "
                                 f"{type(module).__name__}")
            if tuple(tau.shape[1:]) != tuple(params[name].shape):
                raise ValueError(f"task vector {name!r} has shape {tuple(tau.shape[1:])}, the "
                                 f"parameter has {tuple(params[name].shape)}")
        # A shallow copy: moving it with .to() must not change the caller's object.
        return TaskVectors(list(task_vectors.task_names), list(task_vectors.names),
                           list(task_vectors.tensors), dict(task_vectors.meta), task_vectors.norms)

    def _apply(self, fn, recurse: bool = True):  # keep the task vectors next to the module
        super()._apply(fn, recurse)
        if not self.offload and not self.sharded:  # sharded: the units own (and move) them
            self.task_vectors.tensors = [fn(t) for t in self.task_vectors.tensors]
        return self

    def train(self, mode: bool = True) -> "MergedModel":
        """The base module stays in eval mode: no dropout, no batch-norm statistics updates."""
        super().train(mode)
        self.module.eval()
        return self

    @property
    def task_names(self) -> list[str]:
        return self.task_vectors.task_names

    def lambdas(self) -> torch.Tensor:
        """Effective coefficients ``[rows, K]`` (clamped if clamping is on), differentiable."""
        return self.coefficients.clamp(0.0, 1.0) if self.clamp else self.coefficients

    def merged_parameters(self, reuse_buffers: bool = False) -> dict[str, torch.Tensor]:
        """Merged tensors of the merged parameters, differentiable w.r.t. the coefficients.

        ``reuse_buffers``: write into buffers kept from the previous call instead of allocating
        (a training loop that merges once per step). Tensors from an earlier call are then
        overwritten; a graph still holding them fails loudly in backward (autograd's version
        check), it is never silently wrong.
        """
        if self.sharded:  # each unit merges its own tensors inside the module's forward
            return {}
        params = dict(self.module.named_parameters())
        bases = tuple(params[n] for n in self.task_vectors.names)
        outs = self._step_buffers(bases) if reuse_buffers else None
        merged = _Merge.apply(self.lambdas(), self.rows, bases, tuple(self.task_vectors.tensors), outs,
                              self.row_chunks)
        return dict(zip(self.task_vectors.names, merged))

    def _step_buffers(self, bases: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        bufs = self._merge_buffers
        if bufs is None or any(b.device != x.device or b.dtype != x.dtype or b.numel() != x.numel()
                               for b, x in zip(bufs, bases)):
            bufs = self._merge_buffers = tuple(torch.empty(x.numel(), dtype=x.dtype, device=x.device)
                                               for x in bases)
        return bufs

    def forward(self, *args: Any, params: dict[str, torch.Tensor] | None = None,
                **kwargs: Any) -> Any:
        """Call the base module with merged parameters (``params`` reuses an earlier merge)."""
        if params is None:
            params = self.merged_parameters()
        return functional_call(self.module, params, args, kwargs, strict=False)

    def shard(self, mesh: Any, blocks: Sequence[str], recompute: bool = True, offload: bool = False,
              gather: str = "merged") -> None:
        """Shard the base module and the task vectors over the ranks of ``mesh``: one
        unit per block of ``blocks`` (a pool's ``layout.blocks``) and the rest at the root
        (:mod:`.sharded`; ``gather``: ``"merged"`` gathers each rank's merged rows, ``"stored"`` lets
        FSDP2 gather the stored tensors). The coefficients stay whole on every rank; the module then
        merges itself in its forward (:meth:`merged_parameters` is empty). Collective: every rank calls it."""
        if self.sharded:
            return
        from .sharded import SharedCoefficients, shard_merge, unit_tensors
        root = shard_merge(self.module, self.task_vectors.names, self.task_vectors.tensors, self.rows.tolist(),
                           self.row_chunks, blocks, SharedCoefficients(self.lambdas, _Merge.apply), mesh, recompute,
                           offload, gather)
        self.module, self.sharded, self._merge_buffers = root, True, None
        # the sharded stacks replace the whole ones, which are then freed unless the caller keeps them
        taus = unit_tensors(root)
        self.task_vectors.tensors = [taus[n] for n in self.task_vectors.names]

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict of the merged module: plain, detached, contiguous tensors
        (sharded: gathered unit by unit; collective, every rank calls it)."""
        if self.sharded:
            from .sharded import gathered_state_dict
            return gathered_state_dict(self.module)
        merged = self.merged_parameters()
        # by tensor identity: a tied weight (an output layer sharing the embedding) is merged under
        # each of its names, as functional_call uses it in the forward
        own = dict(self.module.named_parameters())
        by_id = {id(own[n]): m for n, m in merged.items()}
        return {k: by_id.get(id(v), merged.get(k, v)).detach().contiguous().clone()
                for k, v in self.module.state_dict(keep_vars=True).items()}

    def row_names(self) -> list[str]:
        """What each coefficient row merges: ``["*"]`` task-wise, else the parameter names, a
        fused q/k/v parameter's rows as ``name[q]``, ``name[k]``, ``name[v]`` (``split_qkv``)."""
        if self.granularity != "layerwise":
            return ["*"]
        if self.row_chunks is None:
            return list(self.task_vectors.names)
        return [f"{n}[{part}]" if c == 3 else n for n, c in zip(self.task_vectors.names, self.row_chunks)
                for part in (QKV_PARTS if c == 3 else ("",))]

    def coefficient_table(self) -> dict[str, list[float]]:
        """Effective coefficients per task (one value per row, in :meth:`row_names` order)."""
        lam = self.lambdas().detach().float().cpu()
        return {t: lam[:, k].tolist() for k, t in enumerate(self.task_names)}
