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
loss also trains them. Differences from the official schedule: docs/fidelity.md.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

import torch
from torch import nn

from ..engine.merged_model import Granularity
from ..engine.objectives import feature_l1
from ..models.pool import ModelPool
from .adamerging import AdaMerging
from .parts import MethodParts, Objective


class SurgeryAdapter(nn.Module):
    """``f - up(relu(down(f)))``; ``up`` starts at zero, so the adapter starts as the identity."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # Kaiming-uniform (a=sqrt(5)), nn.Linear's default
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(self.down.weight.dtype)
        return x - self.up(torch.relu(self.down(x)))


def _feature_l1(m: "Surgery", images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Mean L1 distance of each task's adapted features to its expert's features."""
    feats = m.train_features(images, indices, params)
    return {t: feature_l1(m.task_modules[t](f), m.expert_features(t, indices[t], f.device, images[t]))
            for t, f in feats.items()}


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
                 offload: bool = False, expert_chunk: int = 64, expert_weights_mb: int = 4096) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        adapters = lambda m: {t: SurgeryAdapter(m.feature_dim(), rank) for t in m.task_names}
        super().__init__(pool, granularity=granularity, prior=prior, clamp=clamp, lr=lr,
                         per_task_backward=per_task_backward, trim=trim,
                         task_vector_dtype=task_vector_dtype, offload=offload,
                         learn_coefficients=learn_coefficients, init_from=init_from,
                         expert_chunk=expert_chunk, expert_weights_mb=expert_weights_mb, _parts=MethodParts(FEATURE_L1, task_modules=adapters))

    def task_head(self, task: str) -> nn.Module:
        if task not in self.task_modules:  # an unseen task: no expert, so no adapter
            return self.heads[task]
        return nn.Sequential(self.task_modules[task], self.heads[task])

    def export_task_modules(self) -> dict[str, torch.Tensor]:
        """``{task}.down`` ``[rank, dim]`` and ``{task}.up`` ``[dim, rank]`` per task."""
        return {f"{t}.{part}": getattr(m, part).weight.detach()
                for t, m in self.task_modules.items() for part in ("down", "up")}

    @classmethod
    def load_export_task_modules(cls, tensors):
        """Each task's :class:`SurgeryAdapter` from ``{task}.down`` / ``{task}.up``."""
        out = {}
        for key in tensors:
            task, _, part = key.rpartition(".")
            if part != "down":
                continue
            down, up = tensors[key], tensors.get(f"{task}.up")
            if up is None:
                raise ValueError(f"task_modules.safetensors: {key} without {task}.up")
            adapter = SurgeryAdapter(down.shape[1], down.shape[0]).to(down.dtype)
            adapter.load_state_dict({"down.weight": down, "up.weight": up})
            out[task] = adapter
        return out
