"""Two toy methods, added the way the README's checklist says, to show (and test) what adding a
method takes: a fitted one (one function) and a learned one (an objective on the engine)."""

from __future__ import annotations

from types import MappingProxyType

import torch

from adamerge.methods import AdaMerging
from adamerge.methods.parts import MethodParts, Objective
from adamerge.models.pool import LoadedPool, ModelPool


def data_weighted(loaded: LoadedPool, data, scaling: float = 0.3) -> dict[str, torch.Tensor]:
    """Fitted toy: task arithmetic whose task k weighs ``K n_k / sum n`` (``n_k``: its number of
    adaptation images), i.e. statistics of the data, then one model."""
    tv = loaded.task_vectors
    counts = torch.tensor([float(len(data[t])) for t in tv.task_names])
    weights = scaling * counts * len(counts) / counts.sum()
    base = dict(loaded.encoder.named_parameters())
    return {n: base[n].detach() + torch.einsum("k,k...->...", weights.to(tau.dtype), tau)
            for n, tau in zip(tv.names, tv.tensors)}


def _max_probability(m, images, indices, params, labels=None) -> dict[str, torch.Tensor]:
    """Learned toy objective: the negative mean top-1 probability of each head."""
    return {t: -z.float().softmax(-1).amax(-1).mean() for t, z in m.task_logits(images, params).items()}


MAX_PROBABILITY = Objective("max_probability", "neg_max_prob", _max_probability)


class ToyConfidence(AdaMerging):
    """Learned toy: AdaMerging's coefficients, trained to raise each head's top probability."""

    method = "toy_confidence"
    identity = ("granularity",)
    objectives = MappingProxyType({MAX_PROBABILITY.name: MAX_PROBABILITY})

    def __init__(self, pool: ModelPool, granularity: str = "layerwise", prior: float = 0.3, lr: float = 1e-3) -> None:
        super().__init__(pool, granularity=granularity, prior=prior, lr=lr, _parts=MethodParts(MAX_PROBABILITY))
