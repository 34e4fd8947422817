"""Twin-Merging: a shared task-arithmetic expert plus SVD-compressed exclusive parts, mixed per input.

Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging", NeurIPS
2024; official code LZY-the-boys/Twin-Merging (read at commit f481c60; the discriminative
RoBERTa/GLUE pipeline, ``discriminative/``; the repository has no vision code). What it does:

* shared expert: task arithmetic ``theta_s = theta_0 + s * sum_k tau_k`` (``merge.py:305-309``)
  with ``s = 0.29`` (``scripts.sh:128`` ``for j in 0.29``, ``config/twin_merge.yml:17-19``;
  the generative LLM config uses 0.3), over every parameter except ``.*classifier.*`` and
  ``.*bias.*`` (``scripts.sh:136``), saved as a model (``run.sh:6-9``);
* exclusive ("twin") vectors ``theta_k - theta_s`` per parameter (``twin_merge.py:30-44``),
  compressed by ``sparsify.svd`` with density ``1 - mask_rate`` = 0.1 (``scripts.sh:197-198``:
  ``mask_strategy svd``, ``mask_rate 0.9``): ``torch.linalg.svd``, rank ``int(density *
  len(S))``, stored dense as ``U[:, :r] diag(S[:r]) Vh[:r]`` (``sparsify.py:53-81``); density
  >= 1 keeps the tensor unchanged (``sparsify.py:58-59``) and 1-D tensors stay untruncated
  (``sparsify.py:62-64``); the twin vectors cover the same parameters as the shared merge
  (excluded ones: ``twin_merge.py:80-83``, ``scripts.sh:214``);
* router input: the shared expert's last hidden state averaged over tokens
  (``router.py:79``, ``router.py:93-101``), computed once per example before the merge;
* router: ``SimpleMLP`` (``router.py:134-166``): ``Linear(D, H)``, BatchNorm1d, leaky ReLU,
  dropout 0.5, ``Linear(H, H)``, BatchNorm1d, leaky ReLU, dropout 0.5, ``Linear(H, K)``, with
  ``H = 2 D`` (``router.py:218-220``), PyTorch's default initialisation;
* router training: cross-entropy of its logits to the *task index* of each example
  (``router.py:168-199``; no class labels), on up to 5,500 *train-split* examples per task
  (``router.py:301``), HF ``Trainer`` with lr 5e-4, batch 1024, 50 epochs (AdamW without weight
  decay, linear decay; ``router.py:251-273``), keeping the epoch with the best task accuracy on
  1,000 test examples per task (``router.py:302``, ``load_best_model_at_end``);
* inference, one example at a time (``twin_merge.py:123-151``): ``w = softmax(router logits)``
  (``twin_merge.py:129``), ``theta = theta_s + sum_k w_k twin_k`` (``twin_merge.py:133-134``).

Here (:class:`TwinMerging`, a learned method on the AdaMerging engine):

* the shared expert is the engine's merge with task-wise coefficients fixed at ``scaling`` (0.29)
  over every merged parameter (biases included: see the deviations);
* the routed layers are linear layers (``layers``: ``linear``, every ``nn.Linear`` called as a
  module, default; ``mlp``; or a list of names); each holds, per expert, the rank-``int(
  rank_fraction * min(H, D))`` SVD truncation of its weight's twin vector (the official 10%),
  stored as low-rank factors (``storage: lowrank``) or as the dense product (``dense``; ``auto``
  picks per layer whichever is smaller), and the untruncated twin vector of its bias;
  ``rank_fraction >= 1`` keeps the exact dense twin vectors (no SVD), as the official code does.
  Every other parameter stays ``theta_s``;
* per input, a first forward of the shared expert gives the encoder's output feature, the
  router gives ``softmax`` weights over the K experts, and a second forward runs the routed
  layers with ``theta_s + sum_k w_k(x) twin_k``: the dense layers through WEMoE's
  :class:`~adamerge.methods.wemoe.RoutedLinear` / ``RoutedLinearFunction`` (the per-sample weight
  mixing, unchanged), the low-rank ones as ``x theta_s^T + ((x V) * w) (U S)^T`` (no per-sample
  weight is formed);
* ``objective: task_id`` (the official one): cross-entropy of the router's logits to the task
  index of each adaptation image (the batch's task; class labels are never read), on whatever
  the data module streams: the registry row uses ``data: {shots, shots_split: train}`` (a few
  training images per class, as the official trains on the train split); ``objective:
  entropy`` (our variant): entropy of each task head on the routed model's features of
  unlabeled test batches, gradients through the routed layers into the router;
* checkpoints hold the router's parameters and BatchNorm buffers (``router.*``); resume is exact
  (dropout masks are drawn from a generator seeded by the global step, not the global RNG).

Deviations from the official code: biases are merged by task arithmetic and routed (their twin
vectors untruncated) instead of being excluded from the merge and taken from the evaluated
task's own fine-tuned model (``twin_merge.py:139-143``, an oracle on the task identity);
parameters outside linear layers (LayerNorm, embeddings, the patch convolution, and open_clip's
``nn.MultiheadAttention`` projections, which are not called as modules) stay ``theta_s`` where the
official routes every non-bias parameter (LayerNorm weights untruncated, embeddings truncated);
the router reads the encoder's output feature (CLIP's image embedding) instead of the mean of the
last hidden states; the router is trained inside the adaptation run (Adam, lr 5e-4, linear decay
over the run's ``max_steps``, no best-epoch selection on test data) on the data module's batches;
each batch's routing is computed on all tasks' images at once (a mixed batch for BatchNorm, as the
official shuffled training set is).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..engine.merged_model import MergedModel
from ..io.export import read_method_export
from ..engine.svd import svd
from ..engine.task_vectors import TaskVectors
from ..models.layout import Layout, infer_layout
from ..models.pool import ModelPool
from .adamerging import OBJECTIVES, AdaMerging, images_of
from .parts import MethodParts, Objective, pick_objective
from .wemoe import RoutedLinear, _shallow_module_copy

STORAGES = ("auto", "lowrank", "dense")
ROUTER_NORMS = ("batch", "none")
DROPOUT_SEED = 0x7717  # the router's dropout masks: seeded by (this, global step, call)


def find_linears(module: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of ``module`` that are called as modules: every
    one except those inside an ``nn.MultiheadAttention`` (whose forward reads ``out_proj.weight``
    directly, so a routed replacement would never run), in module order."""
    attention = [n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)
            and not any(n.startswith(f"{a}.") if a else True for a in attention)]


def routed_layer_names(module: nn.Module, encoder: nn.Module, names: Sequence[str],
                       requested: str | Sequence[str], layout: Layout | None, what: str) -> list[str]:
    """The linear layers a routed method (Twin-Merging, SMILE) routes, among those with a weight
    task vector (``names``): ``linear`` (:func:`find_linears` of ``module``), ``mlp`` (the MLPs' two
    layers of ``layout``, read off ``encoder`` when ``None``) or the names given (one-line error for a
    name without a task vector)."""
    if requested == "linear":
        return [n for n in find_linears(module) if f"{n}.weight" in names]
    if requested == "mlp":
        return [n for pair in (layout or infer_layout(encoder)).mlps for n in pair if f"{n}.weight" in names]
    layers = list(requested)
    missing = [n for n in layers if f"{n}.weight" not in names]
    if missing:
        raise ValueError(f"{what}: layers {missing[:3]} have no task vector (the pool's task vectors cover "
                         f"{len(names)} parameters, e.g. {list(names)[:3]})")
    return layers


class TwinRouter(nn.Module):
    """The official ``SimpleMLP`` router: features ``[B, D]`` -> logits over the K experts.

    ``Linear(D, H)``, norm, leaky ReLU, dropout, ``Linear(H, H)``, norm, leaky ReLU, dropout,
    ``Linear(H, K)`` (``out``); ``H = 2 D`` unless ``hidden`` is given; ``norm``: ``batch``
    (BatchNorm1d, official) or ``none``. Dropout masks come from a generator seeded by the step
    set with :meth:`set_step` and a per-step call count, so a resumed run draws the same masks.
    """

    def __init__(self, dim: int, num_experts: int, hidden: int | None = None,
                 norm: Literal["batch", "none"] = "batch", dropout: float = 0.5) -> None:
        super().__init__()
        if norm not in ROUTER_NORMS:
            raise ValueError(f"router_norm must be one of {', '.join(ROUTER_NORMS)}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"router_dropout must be in [0, 1), got {dropout}")
        hidden = hidden or 2 * dim
        self.dim, self.hidden, self.norm, self.dropout = dim, hidden, norm, dropout
        self.fc1, self.fc2, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, num_experts)
        make = (lambda: nn.BatchNorm1d(hidden)) if norm == "batch" else nn.Identity
        self.norm1, self.norm2 = make(), make()
        self._step, self._calls = -1, 0

    def set_step(self, step: int) -> None:
        if step != self._step:
            self._step, self._calls = step, 0

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0:
            return h
        g = torch.Generator(device=h.device)
        g.manual_seed(DROPOUT_SEED * 1_000_003 + max(self._step, 0) * 7919 + self._calls)
        self._calls += 1
        keep = torch.rand(h.shape, generator=g, device=h.device) >= self.dropout
        return h * keep.to(h.dtype) / (1.0 - self.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features.to(self.fc1.weight.dtype)
        h = self._drop(F.leaky_relu(self.norm1(self.fc1(h))))
        h = self._drop(F.leaky_relu(self.norm2(self.fc2(h))))
        return self.out(h)


class TwinRouting:
    """The routing of one forward: ``weights`` ``[B, K]`` (``None``: the shared expert) and the
    router that makes them. A forward of the encoder computes them itself (a first, shared pass;
    see :func:`install_twin`) unless they are already set."""

    def __init__(self, router: Callable[[], nn.Module]) -> None:
        self.router = router
        self.weights: torch.Tensor | None = None
        self.shared = False  # a shared-expert pass is running: routed layers are plain
        self.auto = False    # the weights were set by the encoder's own first pass
        self.groups: tuple[int, ...] | None = None  # routed per sample (RoutedLinear's batch groups)


class TwinLinear(RoutedLinear):
    """A linear layer computing ``x (theta_s + sum_k w_k twin_k)^T`` per sample.

    ``twin()`` returns ``(kind, a, b, bias)``: ``("dense", [K, H, D], None, [K, H] | None)`` (the
    samples' weights are mixed by :class:`RoutedLinear`) or ``("lowrank", A [D, K r], B [K r, H],
    [K, H] | None)`` with ``A[:, k r + j] = Vh_k[j]`` and ``B[k r + j] = S_k[j] U_k[:, j]``.
    Without routing weights (or in a shared pass) it is the plain layer: the shared expert.
    """

    def __init__(self, linear: nn.Linear, routing: TwinRouting,
                 twin: Callable[[], tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
                 batch_first: bool = True, block_numel: int | None = None) -> None:
        super().__init__(linear, routing, False, lambda: twin()[1::2], batch_first, block_numel)
        self.twin = twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing.weights
        if r is None or self.routing.shared:
            return F.linear(x, self.weight, self.bias)
        kind, a, b, bias = self.twin()
        if kind == "dense":
            return super().forward(x)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        k = r.shape[1]
        y = F.linear(x, self.weight, self.bias)
        if a.shape[1]:
            z = torch.matmul(x, a.to(x.dtype))  # [B, N, K r]
            z = (z.unflatten(-1, (k, -1)) * r.to(x.dtype)[:, None, :, None]).flatten(-2)
            y = y + torch.matmul(z, b.to(x.dtype))
        if bias is not None:
            y = y + torch.mm(r.to(bias.dtype), bias).to(y.dtype)[:, None, :]
        if squeeze:
            return y.squeeze(1)
        return y if self.batch_first else y.transpose(0, 1)


def install_twin(module: nn.Module, layers: Sequence[str], twin_of: Callable[[str], Callable[[], Any]],
                 router: Callable[[], nn.Module], batch_first: bool = True,
                 block_numel: int | None = None) -> TwinRouting:
    """Route ``layers`` of ``module`` in place (:class:`TwinLinear`, sharing the original
    parameters) and hook ``module``'s forward: unless routing weights are already set, a first
    pass of the shared expert gives the features, ``softmax(router()(features))`` the weights,
    then the routed pass runs. Returns the routing state."""
    routing = TwinRouting(router)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
        setattr(parent, child, TwinLinear(linear, routing, twin_of(name), batch_first, block_numel))

    def before(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if routing.shared or routing.weights is not None:
            return
        routing.shared = True
        try:
            features = mod(*args, **kwargs)
        finally:
            routing.shared = False
        routing.weights = torch.softmax(routing.router()(features.detach()).float(), dim=-1)
        routing.auto = True

    def after(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if routing.auto and not routing.shared:
            routing.weights, routing.auto = None, False

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True, always_call=True)
    return routing


def twin_factors(delta: torch.Tensor, rank_fraction: float,
                 storage: Literal["auto", "lowrank", "dense"], name: str = "") -> dict[str, torch.Tensor]:
    """The stored form of the twin vectors ``delta [K, H, D]`` of one weight: ``{"dense": [K, H, D]}``
    or ``{"a": [D, K r], "b": [K r, H]}`` (float32), truncated to rank ``int(rank_fraction *
    min(H, D))`` (``rank_fraction >= 1``: exact, dense)."""
    k, h, d = delta.shape
    if rank_fraction >= 1:
        return {"dense": delta.float()}
    r = int(rank_fraction * min(h, d))
    if storage == "auto":
        storage = "lowrank" if r * (h + d) < h * d else "dense"
    u, s, vh = svd(delta, name=name)
    u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
    if storage == "dense":
        return {"dense": (u * s[:, None, :]) @ vh}
    return {"a": vh.permute(2, 0, 1).reshape(d, k * r).contiguous(),
            "b": (u * s[:, None, :]).transpose(1, 2).reshape(k * r, h).contiguous()}


class TwinLayers:
    """Twin-Merging's merge builder (a :class:`~adamerge.methods.parts.MethodParts` ``merge``):
    task arithmetic with scaling ``prior`` (the shared expert) on a copy of the encoder whose
    chosen linear ``layers`` add each expert's exclusive part (:func:`twin_factors`), mixed per
    input by ``router`` (set once the module has made it). After the build it holds the stored
    twin ``vectors`` (non-persistent buffers), the routed ``layers``, their storage ``kinds`` and
    the ``routing`` state."""

    def __init__(self, rank_fraction: float, storage: str, layers: str | list[str], batch_first: bool,
                 block_numel: int | None) -> None:
        self.rank_fraction, self.storage, self.requested = rank_fraction, storage, layers
        self.batch_first, self.block_numel = batch_first, block_numel
        self.router: nn.Module | None = None
        self.vectors = nn.Module()
        self.layers: list[str] = []
        self.kinds: dict[str, str] = {}
        self.routing: TwinRouting | None = None

    def __call__(self, encoder: nn.Module, task_vectors: TaskVectors, layout: Layout | None = None,
                 **options: Any) -> MergedModel:
        if not isinstance(task_vectors, TaskVectors):
            raise ValueError("Twin-Merging needs dense task vectors; this pool's are low-rank (LoRA)")
        module = _shallow_module_copy(encoder)
        merged = MergedModel(module, task_vectors, **options)
        names = list(task_vectors.names)
        chosen = self.requested
        layers = routed_layer_names(module, encoder, names, chosen, layout, "Twin-Merging")
        if not layers:
            raise ValueError(f"Twin-Merging: no routed layer in {type(encoder).__name__} (layers="
                             f"{chosen!r}); give layers: [name, ...]")
        scaling, dtype = float(options["prior"]), task_vectors.tensors[0].dtype
        holder, kinds = self.vectors, self.kinds  # buffers: moved with the module, never checkpointed
        for i, layer in enumerate(layers):
            tau = task_vectors.tensors[names.index(f"{layer}.weight")].float()
            stored = twin_factors(tau - scaling * tau.sum(0, keepdim=True), self.rank_fraction,
                                  self.storage, name=f"{layer}.weight")
            kinds[layer] = "dense" if "dense" in stored else "lowrank"
            for part, t in stored.items():
                holder.register_buffer(f"{part}{i}", t.to(dtype), persistent=False)
            if f"{layer}.bias" in names:
                tb = task_vectors.tensors[names.index(f"{layer}.bias")].float()
                holder.register_buffer(f"bias{i}", (tb - scaling * tb.sum(0, keepdim=True)).to(dtype),
                                       persistent=False)
        self.layers = layers

        def twin_of(layer: str) -> Callable[[], tuple]:
            i = layers.index(layer)
            if kinds[layer] == "dense":
                return lambda: ("dense", getattr(holder, f"dense{i}"), None, getattr(holder, f"bias{i}", None))
            return lambda: ("lowrank", getattr(holder, f"a{i}"), getattr(holder, f"b{i}"),
                            getattr(holder, f"bias{i}", None))

        self.routing = install_twin(module, layers, twin_of, lambda: self.router, self.batch_first,
                                    self.block_numel)
        return merged


def _task_id(m: "TwinMerging", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Cross-entropy of the router's logits to each image's task index (official; no class
    labels are read)."""
    logits = m.router_logits(m.shared_features(images, params))
    losses, hits, count = {}, 0, 0
    for t, z in logits.items():
        target = torch.full((z.shape[0],), m.task_names.index(t), dtype=torch.long, device=z.device)
        losses[t] = F.cross_entropy(z.float(), target)
        hits, count = hits + int((z.argmax(-1) == target).sum()), count + z.shape[0]
    if count and m.logs_this_step():
        m.log("router/acc", hits / count)
    return losses


TASK_ID = Objective("task_id", "task_ce", _task_id)


class TwinMerging(AdaMerging):
    """Twin-Merging: task arithmetic (``scaling``) as the shared expert, per-input routed
    low-rank exclusive parts of every expert in the linear layers.

    Args:
        scaling: task-arithmetic scaling of the shared expert (official 0.29).
        rank_fraction: rank kept of each linear weight's twin vector, as a fraction of
            ``min(H, D)`` (official 0.1: ``mask_rate 0.9``); ``>= 1``: untruncated.
        storage: ``auto`` (per layer, low-rank factors when smaller than the dense product),
            ``lowrank`` or ``dense``.
        layers: the routed linear layers: ``linear`` (every ``nn.Linear`` called as a module, see
            :func:`find_linears`), ``mlp`` (the MLPs' two layers of the pool's layout, :attr:`adamerge.models.LoadedPool.layout`)
            or a list of qualified layer names.
        objective: ``task_id`` (official: cross-entropy of the router to the task of each
            image) or ``entropy`` (our variant: entropy of each head on the routed model).
        lr: Adam learning rate of the router (official 5e-4).
        lr_schedule: ``linear`` (official: decay to 0 over the run's ``max_steps``) or ``constant``.
        router_hidden: the router's hidden width (default ``2 D``, official).
        router_norm: ``batch`` (BatchNorm1d, official) or ``none``.
        router_dropout: dropout of the router's hidden layers (official 0.5).
        batch_first, routing_block_numel: as in :class:`~adamerge.methods.wemoe.WEMoE`.
        task_vector_dtype: as in :class:`~adamerge.methods.AdaMerging` (the twin vectors are
            stored in it too).
    """

    method = "twin_merging"
    identity = ("objective",)
    objectives = MappingProxyType({o.name: o for o in (TASK_ID, OBJECTIVES["entropy"])})

    def __init__(self, pool: ModelPool, scaling: float = 0.29, rank_fraction: float = 0.1,
                 storage: Literal["auto", "lowrank", "dense"] = "auto",
                 layers: Literal["linear", "mlp"] | list[str] = "linear",
                 objective: Literal["task_id", "entropy"] = "task_id", lr: float = 5e-4,
                 lr_schedule: Literal["linear", "constant"] = "linear", router_hidden: int | None = None,
                 router_norm: Literal["batch", "none"] = "batch", router_dropout: float = 0.5,
                 batch_first: bool = True, routing_block_numel: int | None = None,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        if lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {lr_schedule!r}")
        if not rank_fraction > 0:
            raise ValueError(f"rank_fraction must be > 0, got {rank_fraction}")
        if isinstance(layers, str) and layers not in ("linear", "mlp"):
            raise ValueError(f"layers must be 'linear', 'mlp' or a list of layer names, got {layers!r}")
        twins = TwinLayers(rank_fraction, storage, layers, batch_first, routing_block_numel)
        super().__init__(pool, granularity="taskwise", prior=scaling, clamp=False, lr=lr,
                         task_vector_dtype=task_vector_dtype, learn_coefficients=False,
                         _parts=MethodParts(pick_objective(type(self).objectives, objective), merge=twins))
        self.twin_vectors, self.twin_layers, self.twin_kinds = twins.vectors, twins.layers, twins.kinds
        self.routing, self.batch_first, self.lr_schedule = twins.routing, batch_first, lr_schedule
        self.router = TwinRouter(self.feature_dim(), len(self.task_names), router_hidden, router_norm,
                                 router_dropout)
        twins.router = self.router  # what the routed layers call

    @property
    def trains_encoder(self) -> bool:
        return True  # the routed forward depends on the router

    def shared_features(self, images: dict[str, torch.Tensor],
                        params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared expert's output per task (no graph: nothing before the router is trained)."""
        self.routing.shared = True
        try:
            with torch.no_grad():
                return super().features(images, params)
        finally:
            self.routing.shared = False

    def router_logits(self, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The router's logits per task, from one call on all tasks' features (a mixed batch for
        BatchNorm)."""
        tasks = list(shared)
        logits = self.router(torch.cat([shared[t] for t in tasks]))
        return dict(zip(tasks, logits.split([shared[t].shape[0] for t in tasks])))

    def routed(self, x: torch.Tensor, weights: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The merged encoder on ``x`` with routing weights ``[B, K]`` given."""
        self.routing.weights = weights
        try:
            return self.merged(x, params=params)
        finally:
            self.routing.weights = None

    def features(self, images: dict[str, torch.Tensor],
                 params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per task: the routed model's output (shared pass, router, routed pass)."""
        tasks = list(images)
        weights = {t: torch.softmax(z.float(), dim=-1)
                   for t, z in self.router_logits(self.shared_features(images, params)).items()}
        if len({tuple(images[t].shape[1:]) for t in tasks}) == 1 and len(tasks) > 1:
            feats = self.routed(torch.cat([images[t] for t in tasks]), torch.cat([weights[t] for t in tasks]), params)
            return dict(zip(tasks, feats.split([images[t].shape[0] for t in tasks])))
        return {t: self.routed(images[t], weights[t], params) for t in tasks}

    # ---------------------------------------------------------------------------- training
    def adaptation_step(self, batch: dict[str, Any], step: int, every_task: bool = True) -> torch.Tensor:
        self.router.set_step(step)  # the dropout masks of this step (fit and online alike)
        return super().adaptation_step(batch, step, every_task)

    @torch.no_grad()
    def router_accuracy(self, images: dict[str, torch.Tensor]) -> float:
        """Fraction of ``images`` (per task) whose arg-max routing weight is their task (router in
        eval mode)."""
        was = self.router.training
        self.router.eval()
        try:
            params = self.merged.merged_parameters()
            logits = self.router_logits(self.shared_features({t: images_of(x) for t, x in images.items()}, params))
        finally:
            self.router.train(was)
        hits = sum(int((z.argmax(-1) == self.task_names.index(t)).sum()) for t, z in logits.items())
        return hits / sum(z.shape[0] for z in logits.values())

    def extra_learned_state(self) -> dict[str, torch.Tensor]:
        return {f"router.{k}": v for k, v in self.router.state_dict().items()}

    def optimizers_for(self, total_steps: int | None) -> Any:
        optimizer = super().optimizers_for(total_steps)
        steps = total_steps or 0
        if self.lr_schedule == "constant" or steps < 1:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:  # BatchNorm statistics: one per rank until averaged here
            with torch.no_grad():
                for m in self.router.modules():
                    if isinstance(m, nn.BatchNorm1d):
                        for buf in (m.running_mean, m.running_var):
                            buf.copy_(trainer.strategy.reduce(buf.clone(), reduce_op="mean"))
        super().on_train_end()

    @torch.no_grad()
    def accuracies(self, datasets: Mapping[str, Dataset], batch_size: int = 256) -> dict[str, float]:
        """As :meth:`AdaMerging.accuracies`, with the router in eval mode (BatchNorm's running
        statistics, no dropout); each batch is routed by the encoder itself."""
        was = self.router.training
        self.router.eval()
        try:
            return super().accuracies(datasets, batch_size)
        finally:
            self.router.train(was)

    # ------------------------------------------------------------------------------ export
    def export_extra(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """``twin.safetensors``: the router (``router.*``) and the routed layers' twin vectors
        (``twin.{layer}.dense`` ``[K, H, D]`` or ``.a`` ``[D, K r]`` / ``.b`` ``[K r, H]``, and
        ``.bias`` ``[K, H]``); ``merged.safetensors`` holds the shared expert. Rebuild with
        :func:`load_twin`."""
        tensors = {f"router.{k}": v.detach() for k, v in self.router.state_dict().items()}
        for i, layer in enumerate(self.twin_layers):
            for part in ("dense", "a", "b", "bias"):
                t = getattr(self.twin_vectors, f"{part}{i}", None)
                if t is not None:
                    tensors[f"twin.{layer}.{part}"] = t.detach()
        meta = {"twin": json.dumps({"layers": self.twin_layers, "kinds": self.twin_kinds,
                                    "tasks": list(self.task_names), "batch_first": self.batch_first,
                                    "router": {"dim": self.router.dim, "hidden": self.router.hidden,
                                               "norm": self.router.norm, "dropout": self.router.dropout}})}
        return {"twin.safetensors": (tensors, meta)}

    @classmethod
    def load_export(cls, encoder: nn.Module, folder: Path) -> nn.Module:
        return load_twin(encoder, folder)


def load_twin(module: nn.Module, folder: str | Path, routing_block_numel: int | None = None) -> nn.Module:
    """Rebuild an exported Twin-Merging model on ``module`` (e.g. an open_clip model's ``visual``),
    in place: ``merged.safetensors`` (the shared expert, strict) and the router and twin vectors of
    ``twin.safetensors`` (kept as buffers of the routed layers, so ``.to(device)`` moves them).
    Returns ``module`` in eval mode; ``module(images)`` routes each image."""
    meta, tensors = read_method_export(module, folder, "twin", "layers", "Twin-Merging")
    opts = meta["router"]
    router = TwinRouter(opts["dim"], len(meta["tasks"]), opts["hidden"], opts["norm"], opts["dropout"])
    router.load_state_dict({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")})
    module.twin_router = router  # registered: .to(device) moves it
    holders: dict[str, nn.Module] = {}

    def twin_of(layer: str) -> Callable[[], tuple]:
        holder = nn.Module()
        for part in ("dense", "a", "b", "bias"):
            holder.register_buffer(part, tensors.get(f"twin.{layer}.{part}"))
        holders[layer] = holder
        if meta["kinds"][layer] == "dense":
            return lambda: ("dense", holder.dense, None, holder.bias)
        return lambda: ("lowrank", holder.a, holder.b, holder.bias)

    install_twin(module, meta["layers"], twin_of, lambda: module.twin_router, meta["batch_first"],
                 routing_block_numel)
    for layer, holder in holders.items():  # the twin vectors move with the routed layer
        module.get_submodule(layer).twin_vectors = holder
    module.requires_grad_(False)
    return module.eval()
