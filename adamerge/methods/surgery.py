"""Representation Surgery: a per-task feature adapter on the merged encoder, trained to match
each expert's features on the unlabeled adaptation images.

Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024; official code
EnnengYang/RepresentationSurgery (``src/merging_model.py``, ``src/main_*_with_surgery.py``).
Per task, on the merged encoder's output ``f`` (before the head's L2 normalisation, as there):
``f' = f - up(relu(down(f)))``, ``down: dim -> rank`` and ``up: rank -> dim`` without bias,
``down`` Kaiming-uniform (``nn.Linear``'s default) and ``up`` zero, so training starts exactly at
the merged model. Loss: mean L1 distance of ``f'`` to the task expert's features of the same
images. Adam, lr 1e-3; the coefficients stay fixed (task arithmetic's 0.3, or a finished
AdaMerging run's via ``init_from``) unless ``learn_coefficients`` is set, in which case the same L1
loss also trains them. ``feature_norm: fusionbench`` switches to FusionBench's form of the recipe
(L2-normalised features; see :class:`Surgery`). Differences from the official schedule:
docs/fidelity.md.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.merged_model import Granularity
from ..engine.objectives import feature_l1
from ..models.pool import ModelPool
from .adamerging import AdaMerging
from .parts import MethodParts, Objective

FeatureNorm = Literal["none", "fusionbench"]
FEATURE_NORMS: tuple[str, ...] = get_args(FeatureNorm)
# export key (a 0-d tensor, 1) of an adapter that L2-normalises its input (feature_norm: fusionbench)
NORMALIZE_INPUT = "normalize_input"


class SurgeryAdapter(nn.Module):
    """``f - up(relu(down(f)))``; ``up`` starts at zero, so the adapter starts as the identity.

    ``normalize_input``: L2-normalise ``f`` first (FusionBench's form; the output is not
    normalised again). A plain attribute, not a buffer: checkpoints hold the weights only.
    """

    def __init__(self, dim: int, rank: int, normalize_input: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # Kaiming-uniform (a=sqrt(5)), nn.Linear's default
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.normalize_input = normalize_input

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(self.down.weight.dtype)
        if self.normalize_input:
            x = F.normalize(x, dim=-1)
        return x - self.up(torch.relu(self.down(x)))


class _UnnormalizedHead(nn.Module):
    """A head that L2-normalises its input (a zero-shot CLIP head), without that normalisation:
    its one linear layer on the features as they come (FusionBench's logits on Surgery's output)."""

    normalizes_features = False

    def __init__(self, head: nn.Module, task: str) -> None:
        super().__init__()
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if len(linears) != 1:
            raise ValueError(f"model.feature_norm 'fusionbench': head {task!r} ({type(head).__name__}) "
                             f"normalises its features and has {len(linears)} linear layers, not one; "
                             "cannot apply it without its normalisation")
        self.linear = linears[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.to(self.linear.weight.dtype))


def _feature_l1(m: "Surgery", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Mean L1 distance of each task's adapted features to its expert's features (both sides
    L2-normalised with ``feature_norm: fusionbench``; the caches hold raw features)."""
    feats = m.train_features(images, indices, params)
    out = {}
    for t, f in feats.items():
        expert = m.expert_features(t, indices[t], f.device, images[t])
        if m.feature_norm == "fusionbench":
            expert = F.normalize(expert.float(), dim=-1)
        out[t] = feature_l1(m.task_modules[t](f), expert)  # the adapter normalises f itself
    return out


FEATURE_L1 = Objective("feature_l1", "l1", _feature_l1, needs_experts=True)


class Surgery(AdaMerging):
    """Representation Surgery on a merged model (task arithmetic, TIES-trimmed or AdaMerging).

    Args:
        rank: width of each adapter's bottleneck (the paper's 16).
        granularity, prior, clamp, trim, task_vector_dtype, offload, per_task_backward: as in
            :class:`~adamerge.methods.AdaMerging`; with fixed coefficients ``taskwise`` and
            ``prior`` 0.3 is task arithmetic with scaling 0.3 (the paper's TA + Surgery).
        lr: Adam learning rate of the adapters (and coefficients if learned); the paper's 1e-3.
        learn_coefficients: also train the coefficients with the L1 loss (the paper keeps them fixed).
        init_from: checkpoint whose coefficients are used, e.g. a finished layer-wise AdaMerging
            run (the paper's AdaMerging + Surgery).
        expert_chunk, expert_weights_mb: as in :class:`~adamerge.methods.AdaMerging` (each
            image's expert features are computed once, with the batch it came in).
        feature_norm: which features the adapters and the L1 loss see.

            * ``none`` (default, the official EnnengYang/RepresentationSurgery code): the
              encoder's raw output; the head normalises after the adapter, as zero-shot CLIP
              heads do.
            * ``fusionbench`` (FusionBench at ``54c9e8c``): the merged encoder's output is
              L2-normalised before the adapter (``fusion_bench/models/hf_clip.py`` L169-183: the
              embedding is normalised, then ``compute_surgery_features``), the expert's features
              are L2-normalised before the loss (``fusion_bench/method/surgery/
              clip_layer_wise_adamerging_surgery.py`` L143-151: both sides from
              ``compute_features``, ``normalize=True`` by default,
              ``fusion_bench/mixins/clip_classification.py`` L281-303), and the adapter's output
              goes to the head without a second normalisation (``hf_clip.py`` L185-188:
              ``logit_scale * text_embeds @ image_embeds.T``): a head that normalises its input
              is applied as its linear layer alone. Unseen tasks (no adapter) keep their head.
              Training, validate/test, ``predict``, ``online`` and ``export`` (the adapters carry
              the normalisation; the heads are written without it) all follow it.
    """

    method = "surgery"
    task_modules_apply = ("features = features - relu(features @ down.T) @ up.T, on the encoder's "
                          "output, before the head (and before its L2 normalisation)")
    identity = ("granularity", "trim", "learn_coefficients", "init_from")
    objectives = MappingProxyType({FEATURE_L1.name: FEATURE_L1})

    def __init__(self, pool: ModelPool, rank: int = 16, granularity: Granularity = "taskwise",
                 prior: float = 0.3, clamp: bool = True, lr: float = 1e-3,
                 learn_coefficients: bool = False, init_from: str | None = None,
                 per_task_backward: bool = False, trim: float | None = None,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 offload: bool = False, expert_chunk: int = 64, expert_weights_mb: int = 4096,
                 feature_norm: FeatureNorm = "none") -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"model.feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {feature_norm!r}")
        normalize = feature_norm == "fusionbench"
        adapters = lambda m: {t: SurgeryAdapter(m.feature_dim(), rank, normalize) for t in m.task_names}
        super().__init__(pool, granularity=granularity, prior=prior, clamp=clamp, lr=lr,
                         per_task_backward=per_task_backward, trim=trim,
                         task_vector_dtype=task_vector_dtype, offload=offload,
                         learn_coefficients=learn_coefficients, init_from=init_from,
                         expert_chunk=expert_chunk, expert_weights_mb=expert_weights_mb, _parts=MethodParts(FEATURE_L1, task_modules=adapters))
        self.feature_norm = feature_norm
        if normalize:  # what export writes into task_modules.safetensors' metadata
            self.task_modules_apply = ("features = normalize(features); features = features - relu(features @ down.T) "
                                       "@ up.T, on the encoder's output; the head is applied without normalising again")

    def _head_after_adapter(self, task: str) -> nn.Module:
        head = self.heads[task]
        if self.feature_norm == "fusionbench" and getattr(head, "normalizes_features", False):
            return _UnnormalizedHead(head, task)
        return head

    def task_head(self, task: str) -> nn.Module:
        if task not in self.task_modules:  # an unseen task: no expert, so no adapter
            return self.heads[task]
        return nn.Sequential(self.task_modules[task], self._head_after_adapter(task))

    def export_heads(self) -> dict[str, nn.Module]:
        """The frozen heads; with ``feature_norm: fusionbench`` the adapted tasks' heads without
        their normalisation (their adapters normalise the encoder's output first)."""
        return {t: self._head_after_adapter(t) if t in self.task_modules else h for t, h in self.heads.items()}

    def export_task_modules(self) -> dict[str, torch.Tensor]:
        """``{task}.down`` ``[rank, dim]`` and ``{task}.up`` ``[dim, rank]`` per task; with
        ``feature_norm: fusionbench`` also ``{task}.normalize_input`` (a 0-d 1), and, for each unseen
        task whose head normalises, a zero adapter with ``normalize_input`` (the normalisation the
        export's heads, written without it, no longer apply)."""
        out = {f"{t}.{part}": getattr(m, part).weight.detach()
               for t, m in self.task_modules.items() for part in ("down", "up")}
        if self.feature_norm != "fusionbench":
            return out
        out.update({f"{t}.{NORMALIZE_INPUT}": torch.ones(()) for t in self.task_modules})
        heads = self.export_heads()
        normalizing = {t: bool(getattr(h, "normalizes_features", False)) for t, h in heads.items()}
        if not all(normalizing.values()):  # heads.safetensors says "not normalised" for every task
            dim = self.feature_dim()
            out.update({k: v for t in self.unseen_tasks if normalizing[t]
                        for k, v in ((f"{t}.down", torch.zeros(1, dim)), (f"{t}.up", torch.zeros(dim, 1)),
                                     (f"{t}.{NORMALIZE_INPUT}", torch.ones(())))})
        return out

    @classmethod
    def load_export_task_modules(cls, tensors):
        """Each task's :class:`SurgeryAdapter` from ``{task}.down`` / ``{task}.up`` (normalising its
        input where ``{task}.normalize_input`` is 1)."""
        out = {}
        for key in tensors:
            task, _, part = key.rpartition(".")
            if part != "down":
                continue
            down, up = tensors[key], tensors.get(f"{task}.up")
            if up is None:
                raise ValueError(f"task_modules.safetensors: {key} without {task}.up")
            normalize = tensors.get(f"{task}.{NORMALIZE_INPUT}")
            adapter = SurgeryAdapter(down.shape[1], down.shape[0],
                                     normalize is not None and bool(normalize)).to(down.dtype)
            adapter.load_state_dict({"down.weight": down, "up.weight": up})
            out[task] = adapter
        return out
