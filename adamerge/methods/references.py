"""Reference rows of every comparison: the pretrained model and the individual experts.

They merge nothing; they bound what a merge can reach (``individual`` is the denominator of the
normalized accuracy).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..engine.task_vectors import TaskVectors
from ..io.checkpoints import StateDict
from ..models.pool import LoadedPool


def pretrained(task_vectors: TaskVectors, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model as it is: no merged tensor replaces any of its parameters."""
    return {}


def individual(loaded: LoadedPool) -> dict[str, Callable[[], StateDict]]:
    """Per task, a loader of that task's own fine-tuned model (its full state dict, read when
    evaluated, so only one expert is in memory at a time)."""
    return dict(loaded.expert_state)
