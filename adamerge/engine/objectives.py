"""Test-time objectives: what a learned merge minimises on unlabeled batches.

Each objective maps a task's outputs on one unlabeled batch (logits or features, and for some the
task expert's outputs on the same images) to a scalar loss. None of them reads a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch (AdaMerging's objective)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def feature_l1(features: torch.Tensor, expert_features: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference to the expert's features of the same images (Representation
    Surgery's objective: ``nn.L1Loss()`` with its default mean reduction)."""
    return F.l1_loss(features.float(), expert_features.float())


def confident_pseudo_label(logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the expert's predicted class, on the images where the expert is trusted.

    Model Tinting's ``crosspseudoconf`` loss: an image is kept when the merged model and the
    expert predict the same class, or when they disagree and the expert's top softmax
    probability is at least the merged model's; the others are dropped. The loss is the mean over
    the kept images (zero, with a zero gradient, when none is kept).
    """
    with torch.no_grad():
        p_expert, y_expert = expert_logits.float().softmax(-1).max(-1)
        p_merged, y_merged = logits.detach().float().softmax(-1).max(-1)
        keep = (y_expert == y_merged) | (p_expert >= p_merged)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), y_expert[keep])


def expert_pseudo_label(logits: torch.Tensor, expert_logits: torch.Tensor,
                        min_confidence: float = 0.0) -> torch.Tensor:
    """Cross-entropy to the expert's predicted class of each image (no labels are read).

    Images whose expert top softmax probability is below ``min_confidence`` are dropped; the
    loss is the mean over the kept ones (zero, with a zero gradient, when none is kept). With
    ``min_confidence=0`` this is the ``crosspseudo`` loss of AIM-SKKU/SyMerge.
    """
    with torch.no_grad():
        p_expert, y_expert = expert_logits.float().softmax(-1).max(-1)
        keep = p_expert >= min_confidence
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), y_expert[keep])
