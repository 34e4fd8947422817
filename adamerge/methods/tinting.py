"""Model Tinting: per-task trainable heads learned jointly with the merging coefficients.

Official code: AIM-SKKU/SyMerge (the successor of AIM-SKKU/ModelTinting), ``src/main_symerge.py``
(read at ``ddc9375``, the head of its main branch; ``src/`` is the same at ``45e4109d``, cited before). The "tinted" layer is each task's classification head: a linear layer
with bias over L2-normalised features, initialised from the frozen zero-shot head (bias 0),
trained together with layer-wise coefficients (prior 0.3, clamped to [0, 1]) by Adam at lr 1e-2.
The loss (``losstype crosspseudoconf``) is cross-entropy to the task expert's predicted class,
on the images where the merged model agrees with the expert or the expert is at least as
confident (:func:`adamerge.engine.objectives.confident_pseudo_label`). ``loss="entropy"`` is the
plain AdaMerging objective on the tinted heads instead. Differences: docs/fidelity.md.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.merged_model import Granularity
from ..engine.objectives import confident_pseudo_label
from ..models.pool import ModelPool
from .adamerging import OBJECTIVES, AdaMerging
from .parts import MethodParts, Objective, pick_objective


class TintedHead(nn.Module):
    """A trainable linear head (with bias) initialised from a frozen one.

    ``normalizes_features``: L2-normalise the features first, as zero-shot CLIP heads do.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, normalizes_features: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
        self.normalizes_features = normalizes_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features, dim=-1) if self.normalizes_features else features
        return self.linear(x.to(self.linear.weight.dtype))


def tinted_heads(m: AdaMerging) -> dict[str, nn.Module]:
    """A :class:`TintedHead` per merged task, initialised from its frozen head."""
    out = {}
    for t in m.task_names:
        linears = [x for x in m.heads[t].modules() if isinstance(x, nn.Linear)]
        if len(linears) != 1:
            raise ValueError(f"tinting needs each head to be one linear layer; head {t!r} has {len(linears)}")
        lin = linears[0]
        out[t] = TintedHead(lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().float(),
                            bool(getattr(m.heads[t], "normalizes_features", False)))
    return out


def _confident_pseudo_label(m: AdaMerging, images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """The official ``crosspseudoconf``: CE to the expert's class where it is trusted."""
    return {t: confident_pseudo_label(z, m.heads[t](m.expert_features(t, indices[t], z.device, images[t])))
            for t, z in m.task_logits(images, params).items()}


PSEUDO_CONFIDENCE = Objective("pseudo_confidence", "pseudo_ce", _confident_pseudo_label, needs_experts=True)


class Tinting(AdaMerging):
    """Model Tinting: coefficients and one trainable head per task, learned together.

    Args:
        loss: ``pseudo_confidence`` (the official ``crosspseudoconf``) or ``entropy``.
        lr: Adam learning rate of coefficients and heads (the official 1e-2).
        granularity, prior, clamp, trim, task_vector_dtype, offload, per_task_backward,
            learn_coefficients, init_from: as in :class:`~adamerge.methods.AdaMerging`.
        expert_chunk, expert_weights_mb: as in :class:`~adamerge.methods.AdaMerging` (experts'
            predictions are computed once per image, with the batch it came in).
    """

    method = "tinting"
    identity = ("granularity", "trim", "loss", "learn_coefficients", "init_from")
    objectives = MappingProxyType({o.name: o for o in (PSEUDO_CONFIDENCE, OBJECTIVES["entropy"])})

    def __init__(self, pool: ModelPool, loss: Literal["pseudo_confidence", "entropy"] = "pseudo_confidence",
                 granularity: Granularity = "layerwise", prior: float = 0.3, clamp: bool = True,
                 lr: float = 1e-2, learn_coefficients: bool = True, init_from: str | None = None,
                 per_task_backward: bool = False, trim: float | None = None,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 offload: bool = False, expert_chunk: int = 64, expert_weights_mb: int = 4096) -> None:
        parts = MethodParts(pick_objective(type(self).objectives, loss, "loss"), task_modules=tinted_heads)
        super().__init__(pool, granularity=granularity, prior=prior, clamp=clamp, lr=lr,
                         per_task_backward=per_task_backward, trim=trim,
                         task_vector_dtype=task_vector_dtype, offload=offload,
                         learn_coefficients=learn_coefficients, init_from=init_from,
                         expert_chunk=expert_chunk, expert_weights_mb=expert_weights_mb, _parts=parts)

    def task_head(self, task: str) -> nn.Module:
        # an unseen task has no expert to tint its head against: its frozen head
        return self.task_modules[task] if task in self.task_modules else self.heads[task]

    def export_heads(self) -> dict[str, nn.Module]:
        return {**self.heads, **self.task_modules}
