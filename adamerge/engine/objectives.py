"""Test-time objectives: what a learned merge minimises on unlabeled batches.

Each objective maps a task head's logits (and, for later objectives, other per-image inputs such
as expert outputs) to a scalar loss.
"""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch (AdaMerging's objective)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
