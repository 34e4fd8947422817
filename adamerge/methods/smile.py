"""SMILE: a sparse mixture of low-rank experts built from the task vectors, routed without training.

Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models", 2024 (arXiv 2408.10174); code in FusionBench (tanganke/fusion_bench, read at
commit 54c9e8c): ``fusion_bench/method/smile_upscaling/smile_upscaling.py`` (the upscaling,
``SmileUpscalingAlgorithm``) and ``fusion_bench/models/smile_moe/linear_from_module.py`` (the
layers). What it does, per ``nn.Linear`` of the model (``_upscale_submodules``, ``smile_upscaling.py``
L224-254, every linear layer; ``average_experts: false`` keeps every other parameter pretrained):

* each expert's difference ``D_k = W_k - W_0`` is decomposed, ``D_k = U_k S_k V_k^T``
  (``SmileMoELinear.__init__``, ``linear_from_module.py`` L201-205);
* the gate (``SmileGate``, L17-80) holds the top ``gate_k`` right singular vectors of each
  ``D_k`` (``V_k[:, :gate_k]^T``, not scaled by ``S_k``; ``routing_use_diff: true``) and scores
  each *token* ``x`` by ``||V_k[:, :gate_k]^T x||_2`` per expert;
* routing (``SmileMoELinear.forward``, L244-303, softmax and top-k L260-265): ``softmax`` over the K scores, the ``top_k``
  largest kept and renormalised to sum to one (with one expert: weight 1);
* expert ``k`` (``SmileCompressedLinear``, L82-145) is the rank-``k`` truncation
  ``U_k[:, :k] S_k[:k] V_k[:, :k]^T`` with bias ``b_k - b_0`` (L239-240);
* the layer's output is ``W_0 x + b_0 + sum_{selected k} w_k (expert_k(x))``.

FusionBench's config ``config/method/smile_upscaling/smile_upscaling.yaml`` L10-12: ``gate_k: 1``,
``k: 128``, ``top_k: 1``. Nothing is trained and no data is read.

Here (:class:`Smile`, a row on the learned engine that learns nothing: it needs the engine's
routed encoder, evaluation and export, not its training): every linear layer called as a module
(:func:`~adamerge.methods.twin.find_linears`) with a task vector is routed; every other parameter
stays pretrained; the experts are stored as low-rank factors (``A [D, K r]``, ``B [K r, H]``) and
all K are applied to every token, each scaled by its routing weight (zero for the experts not
selected), which is the same sum as FusionBench's per-expert gather. ``k <= 0`` (FusionBench: the
full fine-tuned layer) keeps every singular triplet, the same matrix up to round-off.

Deviation: open_clip's ``nn.MultiheadAttention`` projections are not called as modules and stay
pretrained (FusionBench routes the q/k/v/out projections of Hugging Face CLIP's attention); the
SVDs run in float32 (:func:`adamerge.engine.svd.svd`; FusionBench: the model's dtype).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.merged_model import MergedModel
from ..io.export import read_method_export
from ..engine.svd import svd
from ..engine.task_vectors import TaskVectors
from ..models.layout import Layout
from ..models.pool import ModelPool
from .adamerging import AdaMerging
from .parts import MethodParts, pick_objective
from .twin import routed_layer_names
from .wemoe import _shallow_module_copy

FACTORS = ("gate", "a", "b")  # a routed layer's buffers from smile_factors (besides its expert_bias)

def smile_factors(delta: torch.Tensor, k: int, gate_k: int, name: str = "") -> dict[str, torch.Tensor]:
    """The gate and experts of one linear weight from its task vectors ``delta [K, H, D]`` (float32):
    ``gate [K g, D]`` (rows ``k g .. k g + g - 1``: the top ``g = gate_k`` right singular vectors of
    ``delta[k]``), ``a [D, K r]`` and ``b [K r, H]`` with ``a[:, k r + j] = Vh_k[j]`` and ``b[k r + j]
    = S_k[j] U_k[:, j]`` (the rank-``r = k`` truncation; ``k <= 0`` or ``k >= min(H, D)``: every
    triplet)."""
    num, h, d = delta.shape
    full = min(h, d)
    r = full if k <= 0 else min(k, full)
    g = min(max(gate_k, 1), full)
    u, s, vh = svd(delta.float(), name=name)
    return {"gate": vh[:, :g, :].reshape(num * g, d).contiguous(),
            "a": vh[:, :r, :].permute(2, 0, 1).reshape(d, num * r).contiguous(),
            "b": (u[..., :r] * s[:, None, :r]).transpose(1, 2).reshape(num * r, h).contiguous()}


def smile_routing(tokens: torch.Tensor, gate: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Routing weights ``[T, K]`` of ``tokens [T, D]``: ``softmax`` of each expert's gate norm
    ``||gate_k x||``, the ``top_k`` largest kept and renormalised, the others 0 (one expert: 1)."""
    if num_experts == 1:
        return torch.ones(tokens.shape[0], 1, dtype=tokens.dtype, device=tokens.device)
    scores = F.linear(tokens, gate.to(tokens.dtype)).unflatten(-1, (num_experts, -1)).norm(dim=-1)
    weights = torch.softmax(scores, dim=-1)
    kept, index = torch.topk(weights, min(top_k, num_experts), dim=-1)
    kept = kept / kept.sum(-1, keepdim=True)
    return torch.zeros_like(weights).scatter(-1, index, kept)


class SmileLinear(nn.Module):
    """A linear layer plus SMILE's routed low-rank experts, per token.

    It holds the original layer's ``weight`` and ``bias`` under the same names (a functional call
    with merged parameters still reaches them; here they stay pretrained) and, as non-persistent
    buffers (moved and copied with the module, never in its state dict), ``gate [K g, D]``, ``a [D, K
    r]``, ``b [K r, H]`` (see :func:`smile_factors`) and ``expert_bias [K, H]`` (the experts' bias
    differences; ``None`` without a bias). ``route``, when set (tests), replaces the gate:
    ``tokens [T, D] -> weights [T, K]``.
    """

    def __init__(self, linear: nn.Linear, factors: Mapping[str, torch.Tensor], expert_bias: torch.Tensor | None,
                 num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        for part in FACTORS:
            self.register_buffer(part, factors[part], persistent=False)
        self.register_buffer("expert_bias", expert_bias, persistent=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.route: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        tokens = x.reshape(-1, x.shape[-1])
        r = self.route(tokens) if self.route is not None else \
            smile_routing(tokens, self.gate, self.num_experts, self.top_k)
        r = r.to(x.dtype)
        z = torch.matmul(tokens, self.a.to(x.dtype)).unflatten(-1, (self.num_experts, -1))
        out = torch.matmul((z * r[:, :, None]).flatten(-2), self.b.to(x.dtype))
        if self.expert_bias is not None:
            out = out + torch.matmul(r, self.expert_bias.to(x.dtype))
        return y + out.reshape(*x.shape[:-1], out.shape[-1])


def install_smile(module: nn.Module, layers: Mapping[str, tuple[Mapping[str, torch.Tensor], torch.Tensor | None]],
                  num_experts: int, top_k: int) -> None:
    """Replace each layer of ``layers`` (name -> its factors and expert bias differences) of
    ``module`` in place by a :class:`SmileLinear` sharing the original parameters."""
    for name, (factors, expert_bias) in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
        setattr(parent, child, SmileLinear(linear, factors, expert_bias, num_experts, top_k))


class SmileLayers:
    """SMILE's merge builder (a :class:`~adamerge.methods.parts.MethodParts` ``merge``): the
    pretrained model (coefficients 0) on a copy of the encoder whose linear layers (``layers``:
    ``linear``, ``mlp`` or a list of names) are :class:`SmileLinear`. A layer whose weight task
    vectors are all zero is left plain (FusionBench skips it: ``ExpertNotTrainedError``). After the
    build it holds the routed ``layers``."""

    def __init__(self, k: int, gate_k: int, top_k: int, layers: str | list[str]) -> None:
        self.k, self.gate_k, self.top_k, self.requested = k, gate_k, top_k, layers
        self.layers: list[str] = []

    def __call__(self, encoder: nn.Module, task_vectors: TaskVectors, layout: Layout | None = None,
                 **options: Any) -> MergedModel:
        if not isinstance(task_vectors, TaskVectors):
            raise ValueError("SMILE needs dense task vectors; this pool's are low-rank (LoRA)")
        module = _shallow_module_copy(encoder)
        merged = MergedModel(module, task_vectors, **options)
        names = list(task_vectors.names)
        chosen = routed_layer_names(module, encoder, names, self.requested, layout, "SMILE")
        dtype = task_vectors.tensors[0].dtype
        routed: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor | None]] = {}
        for layer in chosen:
            tau = task_vectors.tensors[names.index(f"{layer}.weight")]
            if not bool(tau.any()):
                continue  # no expert moved this layer
            factors = {part: t.to(dtype) for part, t in
                       smile_factors(tau, self.k, self.gate_k, name=f"{layer}.weight").items()}
            bias = task_vectors.tensors[names.index(f"{layer}.bias")].clone() if f"{layer}.bias" in names else None
            routed[layer] = (factors, bias)
        if not routed:
            raise ValueError(f"SMILE: no linear layer to route in {type(encoder).__name__} (layers="
                             f"{self.requested!r}, {len(chosen)} found, none with a nonzero task vector)")
        install_smile(module, routed, task_vectors.num_tasks, self.top_k)
        self.layers = list(routed)
        return merged


class Smile(AdaMerging):
    """SMILE upscaling: the pretrained model whose linear layers add, per token, the top-``top_k``
    of K low-rank experts (each task vector's rank-``k`` SVD truncation), routed by the norm of the
    token's projection on each task vector's top ``gate_k`` right singular vectors. Training-free:
    ``fit`` and ``online`` are refused; ``test``, ``export``, ``predict`` and ``compare`` take it
    as built.

    Args:
        k: rank of each expert (FusionBench 128); ``<= 0``: full rank.
        gate_k: singular vectors per expert in the gate (FusionBench 1).
        top_k: experts mixed per token (FusionBench 1).
        layers: ``linear`` (every ``nn.Linear`` called as a module with a task vector, as FusionBench
            routes every linear layer), ``mlp`` (the MLPs' two layers of the pool's layout) or a list
            of qualified layer names.
        task_vector_dtype: as in :class:`~adamerge.methods.AdaMerging` (the factors are stored in it).
    """

    method = "smile"
    learns = False  # fit and online are refused (AdaMerging.refusal)
    identity = ("k", "gate_k", "top_k", "layers")

    def __init__(self, pool: ModelPool, k: int = 128, gate_k: int = 1, top_k: int = 1,
                 layers: Literal["linear", "mlp"] | list[str] = "linear",
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None) -> None:
        if gate_k < 1:
            raise ValueError(f"model.gate_k must be >= 1 (singular vectors per expert in the gate), got {gate_k}")
        if top_k < 1:
            raise ValueError(f"model.top_k must be >= 1 (experts per token), got {top_k}")
        if isinstance(layers, str) and layers not in ("linear", "mlp"):
            raise ValueError(f"model.layers must be 'linear', 'mlp' or a list of layer names, got {layers!r}")
        smile = SmileLayers(k, gate_k, top_k, layers)
        super().__init__(pool, granularity="taskwise", prior=0.0, clamp=False, learn_coefficients=False,
                         task_vector_dtype=task_vector_dtype,
                         _parts=MethodParts(pick_objective(type(self).objectives, "entropy"), merge=smile))
        self.smile_layers, self.top_k = smile.layers, top_k

    def routed_layers(self) -> dict[str, SmileLinear]:
        """The routed layers of the merged encoder, by name."""
        return {n: self.merged.module.get_submodule(n) for n in self.smile_layers}

    # ------------------------------------------------------------------------------ export
    def export_extra(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """``smile.safetensors``: per routed layer its gate (``smile.{layer}.gate`` ``[K g, D]``),
        expert factors (``.a`` ``[D, K r]``, ``.b`` ``[K r, H]``) and bias differences
        (``.expert_bias`` ``[K, H]``); ``merged.safetensors`` holds the pretrained weights. Rebuild with
        :func:`load_smile`."""
        tensors = {}
        for layer, routed in self.routed_layers().items():
            for part in (*FACTORS, "expert_bias"):
                t = getattr(routed, part)
                if t is not None:
                    tensors[f"smile.{layer}.{part}"] = t.detach()
        meta = {"smile": json.dumps({"layers": self.smile_layers, "tasks": list(self.task_names),
                                     "top_k": self.top_k})}
        return {"smile.safetensors": (tensors, meta)}

    @classmethod
    def load_export(cls, encoder: nn.Module, folder: Path) -> nn.Module:
        return load_smile(encoder, folder)


def load_smile(module: nn.Module, folder: str | Path) -> nn.Module:
    """Rebuild an exported SMILE model on ``module`` (e.g. an open_clip model's ``visual``), in place:
    ``merged.safetensors`` (the pretrained weights, strict) and the gates and experts of
    ``smile.safetensors`` (kept as buffers of the routed layers, so ``.to(device)`` moves them).
    Returns ``module`` in eval mode; ``module(images)`` routes each token."""
    meta, tensors = read_method_export(module, folder, "smile", "layers", "SMILE")
    routed = {layer: ({part: tensors[f"smile.{layer}.{part}"] for part in FACTORS},
                      tensors.get(f"smile.{layer}.expert_bias")) for layer in meta["layers"]}
    install_smile(module, routed, len(meta["tasks"]), int(meta["top_k"]))
    module.requires_grad_(False)
    return module.eval()
