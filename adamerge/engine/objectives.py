"""Test-time objectives: what a learned merge minimises on unlabeled batches.

Each objective maps a task's outputs on one unlabeled batch (logits or features, and for some the
task expert's outputs on the same images) to a scalar loss. None of them reads a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy(logits: torch.Tensor, batch_mean: bool = False) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch (AdaMerging's objective).

    ``batch_mean``: the entropy of ``softmax`` of the batch-*mean* logits instead
    (:func:`entropy_of_mean`)."""
    if batch_mean:
        logits = logits.float().mean(0, keepdim=True)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def entropy_of_mean(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax`` of the batch-mean logits ``[B, C] -> [1, C]``:
    FusionBench's text AdaMerging objective (``logits.mean(dim=0, keepdim=True)`` then
    ``entropy_loss``, fusion_bench/method/adamerging/gpt2_layer_wise_adamerging.py:296-297 and
    flan_t5_layer_wise_adamerging.py:277-278 @54c9e8c; its ``entropy_loss`` adds ``1e-8`` inside
    the log, this is exact). Unlike :func:`entropy` (the mean of the per-example entropies) it
    is low only when the batch's *average* logits favour one class: a batch of confident
    examples that disagree has a high entropy of the mean and a low mean entropy."""
    return entropy(logits, batch_mean=True)


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
