"""The parts a learned method is made of: it picks them, it does not override the engine's hooks.

A learned method is :class:`~adamerge.methods.AdaMerging`'s engine (merged functional model,
Lightning training step, checkpoints, evaluation, export) with three parts of its own:

* an :class:`Objective`: what its learned tensors minimise per task on one batch (entropy,
  cross-entropy to the experts' predictions, Surgery's feature distance, Twin-Merging's task
  identity, ...), and what it needs (the experts' features, labeled batches);
* a merge builder: how the merged model is made from the encoder and the task vectors (the plain
  fused merge by default; WEMoE routes MLPs, AdaRank masks singular components, ...);
* a per-task module factory: trainable modules between the encoder and each head (Surgery's
  adapters, Tinting's heads).

A method's constructor (the YAML schema of its config) builds its parts from its own arguments and
hands them to the engine in one :class:`MethodParts`, so no state is set before
``super().__init__`` and no engine hook is overridden to switch a feature off. Which objectives a
method accepts is declared as its ``objectives`` table and checked with a one-line error
(:func:`pick_objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

# (module, images, indices, params, labels) -> {task: loss}; see AdaMerging.task_losses
Losses = Callable[[Any, dict, dict, dict, "dict | None"], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Objective:
    """What a learned method minimises per task on one batch.

    Attributes:
        name: the value a config gives (``objective: entropy``).
        loss_name: its name in the logs (``train/<loss_name>[/<task>]``).
        losses: ``(module, images, indices, params, labels) -> {task: loss}``.
        needs_experts: reads the experts' features of the batch's images (cached per image).
        needs_labels: reads the batch's labels (few-shot): refused by ``adamerge online``, which
            adapts on an unlabeled stream.
    """

    name: str
    loss_name: str
    losses: Losses
    needs_experts: bool = False
    needs_labels: bool = False


@dataclass(frozen=True)
class MethodParts:
    """The parts a method hands to the engine (see the module docstring).

    Attributes:
        objective: the method's :class:`Objective`.
        merge: ``(encoder, task_vectors, layout=, granularity=, prior=, clamp=, offload=) ->
            MergedModel`` (``layout``: the pool's :class:`~adamerge.models.layout.Layout`);
            ``None``: the plain fused merge (low-rank for LoRA task vectors).
        task_modules: ``(module) -> {task: nn.Module}``, called once the heads exist (e.g. to
            read the feature width); ``None``: no per-task modules.
    """

    objective: Objective
    merge: Callable[..., Any] | None = None
    task_modules: Callable[[Any], dict[str, nn.Module]] | None = None


def pick_objective(objectives: Mapping[str, Objective], name: str, key: str = "objective") -> Objective:
    """``objectives[name]``, or a one-line error naming ``key`` and the accepted values."""
    if name not in objectives:
        raise ValueError(f"{key} must be one of {', '.join(objectives)}, got {name!r}")
    return objectives[name]
