"""WEMoE: weight-ensembling mixture of experts over the MLP task vectors, routed per input.

Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024;
official code tanganke/weight-ensembling_MoE (``scripts/clip_dictmoe.py``,
``src/module/dict_moe.py``, read at commit c401fdc), re-implemented in FusionBench
(``fusion_bench/models/we_moe.py``). Every parameter outside the MLPs is merged by task
arithmetic (scaling 0.3); each transformer MLP layer becomes ``W(x) = W0 + sum_k r_k(x) tau_k``
(weights and biases, ``W0`` the *pretrained* MLP), with one router per block: two linear
layers ``D -> D -> K`` with a ReLU, weights N(0, 0.01^2), hidden bias 0, output bias 0.3, applied
to every token of the MLP's input (after ``ln_2``) and averaged over tokens, so each sample has its
own K weights (raw, no softmax). Only the routers are trained: Adam lr 1e-3, cosine schedule,
entropy of every task head on unlabeled test batches. Differences: docs/fidelity.md.

E-WEMoE (Shen, Tang, Yang et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for
Multi-Task Model Merging", arXiv 2410.21804; FusionBench ``fusion_bench/models/sparse_we_moe.py``,
``fusion_bench/method/sparse_we_moe/``, read at commit 54c9e8c) is two options of this class:
``tv_prune_ratio`` magnitude-prunes the routed MLPs' task vectors, per task and per tensor, before
routing (:func:`~adamerge.methods.sparsify.magnitude_prune_task_vectors`), and ``shared_router``
gives every MLP the same router (FusionBench ``shared_gate``).

The per-sample MLP is never built by a Python loop over samples: :class:`RoutedLinearFunction`
forms all samples' weights ``W0 + r_b @ tau`` by one GEMM per block of output rows and applies
them by a batched product while the block is in cache, and forms them again in the backward
instead of keeping ``[B, H, D]`` tensors alive between forward and backward.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from ..engine.merged_model import MergedModel
from ..io.export import read_method_export
from ..engine.task_vectors import TaskVectors
from ..models.layout import MLP_CHILDREN, Layout, infer_layout
from ..models.pool import ModelPool
from .adamerging import AdaMerging
from .parts import MethodParts, pick_objective
from .sparsify import magnitude_prune_task_vectors

# Values of the samples' weights formed at once in a routed layer ([B, rows, D]): on a CPU small
# enough to stay in cache between being formed and being applied; on a GPU large enough that
# each block is a few big kernels.
ROUTING_BLOCK_NUMEL = {"cpu": 1 << 21, "cuda": 1 << 26}


def block_rows(batch: int, in_features: int, device: torch.device, block_numel: int | None = None) -> int:
    """Output rows per block of a routed layer: ``block_numel`` (default by device) / (B * D)."""
    numel = block_numel or ROUTING_BLOCK_NUMEL.get(device.type, ROUTING_BLOCK_NUMEL["cuda"])
    return max(1, numel // (batch * in_features))


class Router(nn.Module):
    """Per-sample weights of the K task vectors from an MLP's input tokens.

    ``hidden_layers``: 2 (the official default: ``Linear(D, D)``, ReLU, ``Linear(D, K)``), 1
    (``Linear(D, K)``) or 0 (one learned K-vector shared by all inputs: layer-wise coefficients of
    the MLP). Weights start N(0, 0.01^2), the hidden bias 0 and the output bias ``init_lambda``, so
    the merged MLP starts near task arithmetic with scaling ``init_lambda``.
    """

    def __init__(self, dim: int, num_experts: int, hidden_layers: int = 2, init_lambda: float = 0.3) -> None:
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"router_hidden_layers must be 0, 1 or 2, got {hidden_layers}")
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            self.weights = nn.Parameter(torch.full((num_experts,), float(init_lambda)))
            return
        layers: list[nn.Module] = []
        if hidden_layers == 2:
            layers += [nn.Linear(dim, dim), nn.ReLU()]
        layers.append(nn.Linear(dim, num_experts))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.net[-1].bias, float(init_lambda))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` (or ``[B, D]``) -> ``[B, K]``: per-token weights averaged over tokens."""
        if self.hidden_layers == 0:
            return self.weights.expand(tokens.shape[0], -1)
        r = self.net(tokens.to(self.net[0].weight.dtype))
        return r.mean(1) if r.dim() == 3 else r


class RoutedLinearFunction(torch.autograd.Function):
    """``y_b = x_b (W0 + sum_k r_bk tau_k)^T + b0 + sum_k r_bk beta_k`` for every sample ``b``.

    Inputs: ``x [B, N, D]``, ``r [B, K]``, ``weight [H, D]``, ``bias [H]`` or None, ``tau [K, H, D]``,
    ``tau_bias [K, H]`` or None, ``rows`` (output rows per block). Gradients flow to ``x`` and
    ``r`` (the base and the task vectors are frozen). The samples' weights are formed block by
    block of ``rows`` output rows, ``[B, rows, D]`` at a time (one ``[B, K] x [K, rows*D]`` GEMM),
    small enough to stay in cache while a batched product applies them; the backward forms them
    again (nothing of size ``[B, H, D]`` is ever allocated or kept), then ``dx += g W`` and
    ``dr += (g^T x) . tau`` per block.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, tau: torch.Tensor, tau_bias: torch.Tensor | None,
                rows: int) -> torch.Tensor:
        ctx.save_for_backward(x, r, weight, tau, tau_bias)
        ctx.rows = rows
        h = weight.shape[0]
        out = x.new_empty(x.shape[0], x.shape[1], h)
        b = _sample_bias(r, bias, tau_bias, h, x.dtype)  # [B, H]
        for lo in range(0, h, rows):
            w = _sample_weights(r, weight[lo:lo + rows], tau[:, lo:lo + rows])
            out[:, :, lo:lo + rows] = torch.baddbmm(b[:, None, lo:lo + rows], x, w.transpose(1, 2))
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, r, weight, tau, tau_bias = ctx.saved_tensors
        k, h = tau.shape[0], weight.shape[0]
        g = g.to(x.dtype)
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(r.dtype, torch.float32)
        gr = torch.zeros(r.shape, dtype=acc, device=r.device) if ctx.needs_input_grad[1] else None
        for lo in range(0, h, ctx.rows):
            gb = g[:, :, lo:lo + ctx.rows]
            taub = tau[:, lo:lo + ctx.rows]
            if gx is not None:
                gx.baddbmm_(gb, _sample_weights(r, weight[lo:lo + ctx.rows], taub))
            if gr is not None:
                grad_w = torch.bmm(gb.transpose(1, 2), x)  # [B, rows, D]: d loss / d W_b
                # as [K, B] = tau . grad_w^T: MKL runs this ~1.6x faster than the [B, K] product
                gr += torch.mm(taub.reshape(k, -1), grad_w.reshape(x.shape[0], -1).to(tau.dtype).t()).t().to(acc)
        if gr is not None and tau_bias is not None:
            gr += torch.mm(g.sum(1).to(tau_bias.dtype), tau_bias.t()).to(acc)
        return gx, (gr.to(r.dtype) if gr is not None else None), None, None, None, None, None


def _sample_weights(r: torch.Tensor, weight: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``[B, H, D]``: ``weight + sum_k r[b, k] tau[k]`` for each sample (one GEMM; ``weight`` and
    ``tau`` may be a block of rows)."""
    k = tau.shape[0]
    if tau.dtype == weight.dtype:  # the base added by the GEMM itself: no second pass over the block
        return torch.addmm(weight.reshape(1, -1), r.to(tau.dtype), tau.reshape(k, -1)).view(r.shape[0], *weight.shape)
    mixed = torch.mm(r.to(tau.dtype), tau.reshape(k, -1)).to(weight.dtype)
    return mixed.add_(weight.reshape(1, -1)).view(r.shape[0], *weight.shape)


def _sample_bias(r: torch.Tensor, bias: torch.Tensor | None, tau_bias: torch.Tensor | None,
                 out_features: int, dtype: torch.dtype) -> torch.Tensor:
    b = torch.zeros(r.shape[0], out_features, dtype=dtype, device=r.device)
    if bias is not None:
        b += bias.to(dtype)
    if tau_bias is not None:
        b += torch.mm(r.to(tau_bias.dtype), tau_bias).to(dtype)
    return b


class _Routing:
    """The routing weights of one MLP for the forward in progress (set by its first layer).

    ``groups``: sizes of consecutive groups of samples that share one routing vector, the
    average of their samples' (FusionBench's ``batch_reduce``, per task batch); ``None``: every
    sample its own (the default)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.weights: torch.Tensor | None = None
        self.groups: tuple[int, ...] | None = None


class RoutedLinear(nn.Module):
    """A linear layer whose weights are mixed per sample: base + routed task vectors.

    It holds the original layer's ``weight`` and ``bias`` parameters under the same names (so a
    functional call with merged parameters still reaches them). ``tau`` returns the layer's
    stacked task vectors ``([K, H, D], [K, H] | None)`` when called (they live with the merged
    model, which moves them between devices). The first layer of an MLP computes the routing
    weights from its input; the second reuses them.
    """

    def __init__(self, linear: nn.Linear, routing: _Routing, first: bool,
                 tau: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], batch_first: bool = True,
                 block_numel: int | None = None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.routing, self.first, self.tau = routing, first, tau
        self.batch_first, self.block_numel = batch_first, block_numel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        groups = self.routing.groups
        if groups is not None and sum(groups) != x.shape[0]:
            raise ValueError(f"routed MLP: routing groups {list(groups)} do not add up to the batch of {x.shape[0]}")
        if self.first:
            r = self.routing.router(x)
            if groups is not None:  # one routing vector per group: its samples' average
                r = torch.stack([g.mean(0) for g in r.split(list(groups))])
            self.routing.weights = r
        r = self.routing.weights
        if r is None:
            raise RuntimeError("routed MLP: its second layer ran before its first")
        y = self._routed(x, r.to(x.dtype), groups)
        if squeeze:
            return y.squeeze(1)
        return y if self.batch_first else y.transpose(0, 1)


    def _routed(self, x: torch.Tensor, r: torch.Tensor, groups: tuple[int, ...] | None) -> torch.Tensor:
        """The routed product; a group of samples sharing one routing vector is one "sample" of
        ``RoutedLinearFunction`` whose tokens are all of theirs (one weight formed per group)."""
        tau, tau_bias = self.tau()
        if groups is None:
            rows = block_rows(x.shape[0], self.weight.shape[1], x.device, self.block_numel)
            return RoutedLinearFunction.apply(x, r, self.weight, self.bias, tau, tau_bias, rows)
        n = x.shape[1]
        if len(set(groups)) == 1:  # equal groups (every task batch of a step the same size): one call
            xg = x.reshape(len(groups), groups[0] * n, x.shape[2])
            rows = block_rows(len(groups), self.weight.shape[1], x.device, self.block_numel)
            y = RoutedLinearFunction.apply(xg, r, self.weight, self.bias, tau, tau_bias, rows)
            return y.reshape(x.shape[0], n, -1)
        rows = block_rows(1, self.weight.shape[1], x.device, self.block_numel)
        return torch.cat([RoutedLinearFunction.apply(xg.reshape(1, -1, x.shape[2]), r[i:i + 1], self.weight,
                                                     self.bias, tau, tau_bias, rows).reshape(xg.shape[0], n, -1)
                          for i, xg in enumerate(x.split(list(groups)))])


def install_routing(module: nn.Module, mlps: Sequence[tuple[str, str]], routers: Sequence[Router],
                    tau_of: Callable[[str], Callable[[], tuple[torch.Tensor, torch.Tensor | None]]],
                    batch_first: bool = True, block_numel: int | None = None) -> list[_Routing]:
    """Replace, in place, each MLP's two linear layers of ``module`` by :class:`RoutedLinear`
    layers sharing the original parameters; ``tau_of(layer name)`` gives the layer's task vectors.
    Returns the MLPs' routing states (one per MLP)."""
    if len(mlps) != len(routers):
        raise ValueError(f"{len(mlps)} MLPs but {len(routers)} routers")
    routings = []
    for (first, second), router in zip(mlps, routers):
        routing = _Routing(router)
        routings.append(routing)
        for name, is_first in ((first, True), (second, False)):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            linear = getattr(parent, child)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
            setattr(parent, child, RoutedLinear(linear, routing, is_first, tau_of(name), batch_first,
                                                block_numel))
    return routings


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (nothing is duplicated):
    routing changes the copy, never the pool's module (which other runs may share)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


class RoutedMLPs:
    """WEMoE's merge builder (a :class:`~adamerge.methods.parts.MethodParts` ``merge``): the
    fused merge on a copy of the encoder whose MLPs (``mlps``, default every MLP of the layout) are
    :class:`RoutedLinear` layers mixing their task vectors per sample, one :class:`Router` each
    (``router_options``). After the build it holds the ``routers``, the routed ``mlps`` and the
    coefficient ``rows`` of their parameters (kept at 0: the MLPs' base is the pretrained one).

    E-WEMoE's parts: ``prune_ratio`` > 0 magnitude-prunes the routed layers' task vectors (weights
    and biases, each task's tensor on its own; :func:`magnitude_prune_task_vectors`) before they
    are routed; ``shared_router``: one router for every MLP (``routers`` holds it once), each MLP
    still routing on its own input."""

    def __init__(self, router_options: dict[str, Any], mlps: list[list[str]] | None, batch_first: bool,
                 block_numel: int | None, prune_ratio: float = 0.0, shared_router: bool = False) -> None:
        self.router_options, self.requested = router_options, mlps
        self.batch_first, self.block_numel = batch_first, block_numel
        self.prune_ratio, self.shared_router = float(prune_ratio), bool(shared_router)
        self.routers: nn.ModuleList | None = None
        self.mlps: list[list[str]] = []
        self.rows: list[int] = []
        self.routings: list[_Routing] = []

    def __call__(self, encoder: nn.Module, task_vectors: TaskVectors, layout: Layout | None = None,
                 **options: Any) -> MergedModel:
        module = _shallow_module_copy(encoder)
        found = (layout or infer_layout(encoder)).mlps
        mlps = [tuple(p) for p in self.requested] if self.requested else list(found)
        if not mlps:
            raise ValueError(f"WEMoE: the pool's layout names no MLP in {type(encoder).__name__} (generic "
                             f"reading: linear children named {MLP_CHILDREN}); give mlps: [[first, second], ...]")
        names = list(task_vectors.names)
        missing = [f"{layer}.weight" for pair in mlps for layer in pair if f"{layer}.weight" not in names]
        if missing:
            raise ValueError(f"WEMoE: MLP weights {missing[:3]} have no task vector (the pool's task "
                             f"vectors cover {len(names)} parameters, e.g. {names[:3]})")
        routed = {f"{layer}.{part}" for pair in mlps for layer in pair for part in ("weight", "bias")}
        if self.prune_ratio:  # E-WEMoE: the routed task vectors pruned before routing
            task_vectors = magnitude_prune_task_vectors(task_vectors, self.prune_ratio,
                                                        [n for n in names if n in routed])
        merged = MergedModel(module, task_vectors, **options)
        dims = [module.get_submodule(first).in_features for first, _ in mlps]
        if self.shared_router:
            if len(set(dims)) != 1:
                raise ValueError(f"WEMoE: shared_router needs MLPs of one input width, got {sorted(set(dims))}")
            self.routers = nn.ModuleList([Router(dims[0], task_vectors.num_tasks, **self.router_options)])
        else:
            self.routers = nn.ModuleList(Router(d, task_vectors.num_tasks, **self.router_options) for d in dims)
        self.mlps = [list(p) for p in mlps]
        self.rows = [i for i, n in enumerate(names) if n in routed]

        def tau_of(layer: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
            w, b = names.index(f"{layer}.weight"), names.index(f"{layer}.bias") if f"{layer}.bias" in names else None
            return lambda: (merged.task_vectors.tensors[w],
                            merged.task_vectors.tensors[b] if b is not None else None)

        routers = [self.routers[0]] * len(mlps) if self.shared_router else list(self.routers)
        self.routings = install_routing(module, mlps, routers, tau_of, self.batch_first, self.block_numel)
        return merged

    @contextlib.contextmanager
    def grouped(self, sizes: Sequence[int] | None) -> Iterator[None]:
        """Within the block, every MLP routes each group of ``sizes`` consecutive samples by one
        routing vector, its samples' average (``None``: per sample)."""
        for routing in self.routings:
            routing.groups = tuple(int(n) for n in sizes) if sizes is not None else None
        try:
            yield
        finally:
            for routing in self.routings:
                routing.groups = None


class WEMoE(AdaMerging):
    """WEMoE: task arithmetic outside the MLPs, per-sample routed MLP task vectors inside.

    Args:
        scaling: task-arithmetic scaling of every parameter outside the MLPs (official 0.3).
        init_lambda: the routers' output bias at the start (official 0.3).
        router_hidden_layers: 2 (official), 1 or 0 (see :class:`Router`).
        lr: Adam learning rate of the routers (official 1e-3; FusionBench's config 1e-4).
        lr_schedule: ``cosine`` (official: cosine annealing over the run's ``max_steps``) or
            ``constant`` (FusionBench).
        mlps: the MLPs to route as ``[first, second]`` linear-layer names; default every MLP of
            the pool's layout (:attr:`adamerge.models.LoadedPool.layout`).
        batch_first: the encoder's token tensors are ``[B, N, D]`` (open_clip >= 2.23) or
            ``[N, B, D]``.
        routing_block_numel: values of the samples' weights formed at once in a routed layer
            (``[B, rows, D]``); ``None``: 2^21 on a CPU (8 MB in float32, mostly in cache), 2^26
            on a GPU.
        batch_reduce: in the adaptation steps, one routing vector per task batch (the average of
            its samples'), so each MLP merges once per task batch: FusionBench's recipe
            (``batch_reduce: true``, ``fusion_bench/models/we_moe.py`` L171-174). Evaluation,
            prediction and exports route per sample either way, as FusionBench's returned model
            does (``fusion_bench/method/we_moe/we_moe.py`` L244). Default ``False`` (official).
        tv_prune_ratio: E-WEMoE: the fraction of each routed task-vector tensor (each task's MLP
            weight or bias) pruned by magnitude before routing, the rest kept unscaled
            (FusionBench ``tv_prune_ratio``, ``fusion_bench/models/sparse_we_moe.py`` L97-111,
            L186-190; 0.9 in ``config/method/wemoe/sparse_weight_ensembling_moe.yaml`` L12).
            Default 0: no pruning (WEMoE). Part of the pool fingerprint.
        shared_router: E-WEMoE: one router for every MLP (FusionBench ``shared_gate: true``, L17;
            ``fusion_bench/method/sparse_we_moe/sparse_clip_we_moe.py`` L112-122, L176-190).
            Default ``False`` (WEMoE: one router per block).
        per_task_backward, task_vector_dtype, objective: as in :class:`~adamerge.methods.AdaMerging`.
    """

    method = "wemoe"
    identity = ("objective", "tv_prune_ratio", "shared_router")

    def __init__(self, pool: ModelPool, scaling: float = 0.3, init_lambda: float = 0.3,
                 router_hidden_layers: int = 2, lr: float = 1e-3,
                 lr_schedule: Literal["cosine", "constant"] = "cosine",
                 mlps: list[list[str]] | None = None, batch_first: bool = True,
                 routing_block_numel: int | None = None, batch_reduce: bool = False,
                 tv_prune_ratio: float = 0.0, shared_router: bool = False,
                 per_task_backward: bool = False,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 objective: Literal["entropy", "entropy_of_mean", "pseudo_label", "cross_entropy"] = "entropy") -> None:
        if not 0.0 <= tv_prune_ratio <= 1.0:
            raise ValueError(f"model.tv_prune_ratio must be in [0, 1], got {tv_prune_ratio}")
        routing = RoutedMLPs({"hidden_layers": router_hidden_layers, "init_lambda": init_lambda},
                             mlps, batch_first, routing_block_numel, tv_prune_ratio, shared_router)
        super().__init__(pool, granularity="layerwise", prior=scaling, clamp=False, lr=lr,
                         per_task_backward=per_task_backward, task_vector_dtype=task_vector_dtype,
                         learn_coefficients=False, lr_schedule=lr_schedule,  # AdaMerging's cosine
                         _parts=MethodParts(pick_objective(type(self).objectives, objective), merge=routing))
        self.routers, self.mlps, self.lr_schedule = routing.routers, routing.mlps, lr_schedule
        self.router_hidden_layers, self.batch_first = router_hidden_layers, batch_first
        self.batch_reduce, self._routing, self._adapting = bool(batch_reduce), routing, False
        self.shared_router = bool(shared_router)
        if tv_prune_ratio:  # the pruned task vectors are the ones merged: a checkpoint of others is refused
            self.fingerprint = self.merged.task_vectors.fingerprint()
            self.guard.fingerprint = self.fingerprint
        with torch.no_grad():  # the MLPs' merged weights are the pretrained ones: W0 of the mixture
            self.merged.coefficients[routing.rows] = 0.0

    @property
    def trains_encoder(self) -> bool:
        return True  # the routers sit inside the encoder

    def adaptation_step(self, batch: dict[str, Any], step: int, every_task: bool = True) -> torch.Tensor:
        self._adapting = True  # batch_reduce applies to the adaptation steps only
        try:
            return super().adaptation_step(batch, step, every_task)
        finally:
            self._adapting = False

    def encode(self, images: torch.Tensor, params: dict[str, torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
        with self._routing.grouped(sizes if self.batch_reduce and self._adapting else None):
            return self.merged(images, params=params)

    def extra_learned_state(self) -> dict[str, torch.Tensor]:
        return {f"routers.{k}": v for k, v in self.routers.state_dict().items()}

    def export_extra(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """``wemoe.safetensors``: the routers (``router.{i}.*``) and the routed layers' task
        vectors (``tau.{parameter}`` ``[K, ...]``); the metadata says how to rebuild the model
        (:func:`load_wemoe`). ``merged.safetensors`` holds W0 (pretrained) in the routed layers."""
        tv = self.merged.task_vectors
        tensors = {f"router.{k}": v.detach() for k, v in self.routers.state_dict().items()}
        for pair in self.mlps:
            for layer in pair:
                for part in ("weight", "bias"):
                    if f"{layer}.{part}" in tv.names:
                        tensors[f"tau.{layer}.{part}"] = tv.tensors[tv.names.index(f"{layer}.{part}")].detach()
        meta = {"wemoe": json.dumps({"mlps": self.mlps, "tasks": tv.task_names,
                                     "router_hidden_layers": self.router_hidden_layers,
                                     "batch_first": self.batch_first, "shared_router": self.shared_router})}
        return {"wemoe.safetensors": (tensors, meta)}

    @classmethod
    def load_export(cls, encoder: nn.Module, folder: Path) -> nn.Module:
        return load_wemoe(encoder, folder)


def load_wemoe(module: nn.Module, folder: str | Path, routing_block_numel: int | None = None) -> nn.Module:
    """Rebuild an exported WEMoE model on ``module`` (e.g. an open_clip model's ``visual``), in place.

    Loads ``merged.safetensors`` (strict: every key of ``module``) and routes the MLPs named in
    ``wemoe.safetensors`` with its routers and task vectors (kept as buffers of the routed layers,
    so ``module.to(device)`` moves them). Returns ``module``; features are ``module(images)``.
    """
    meta, tensors = read_method_export(module, folder, "wemoe", "mlps", "WEMoE")
    k = len(meta["tasks"])
    routers = nn.ModuleList()
    shared = bool(meta.get("shared_router", False))  # E-WEMoE: one router (router.0.*) for every MLP
    for i, (first, _) in enumerate(meta["mlps"][:1] if shared else meta["mlps"]):
        router = Router(module.get_submodule(first).in_features, k, meta["router_hidden_layers"])
        router.load_state_dict({key[len(f"router.{i}."):]: v for key, v in tensors.items()
                                if key.startswith(f"router.{i}.")})
        routers.append(router)
    module.wemoe_routers = routers  # registered: .to(device) moves them
    holders: dict[str, nn.Module] = {}

    def tau_of(layer: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
        holder = nn.Module()
        holder.register_buffer("weight", tensors[f"tau.{layer}.weight"])
        holder.register_buffer("bias", tensors.get(f"tau.{layer}.bias"))
        holders[layer] = holder
        return lambda: (holder.weight, holder.bias)

    install_routing(module, [tuple(p) for p in meta["mlps"]],
                    [routers[0]] * len(meta["mlps"]) if shared else list(routers), tau_of,
                    meta["batch_first"], routing_block_numel)
    for layer, holder in holders.items():  # the task vectors move with the routed layer
        module.get_submodule(layer).tau_vectors = holder
    module.requires_grad_(False)
    return module
