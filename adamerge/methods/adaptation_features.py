"""The adaptation images' features under frozen weights, computed once per image: the part of a
learned method that serves the experts' features to its objective (pseudo-labels, Surgery's L1,
Tinting's confident pseudo-labels) and, when its merge is fixed, the merged encoder's features.

Both come from :class:`adamerge.engine.expert_features.FeatureCache` over the adaptation datasets
the stream indexes (batches are ``(images, dataset indices)``), in fixed chunks of indices so a
resumed run computes bitwise the same values.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.datamodule import image_of
from ..engine.expert_features import KEEP_EXPERT_BYTES, FeatureCache, Units


class AdaptationFeatures:
    """The experts' feature cache and, for fixed merges, the merged encoder's (see the module doc)."""

    def __init__(self) -> None:
        self.experts: FeatureCache | None = None
        self._adapt: tuple | None = None  # (image loader, sizes, chunk) of the adaptation data
        self._merged: FeatureCache | None = None

    def use(self, encoder: nn.Module, task_vectors, datasets: Mapping[str, Dataset], tasks: Sequence[str],
            chunk: int, cache: bool = True, units: Units | None = None,
            keep_bytes: int = KEEP_EXPERT_BYTES) -> None:
        """Serve features of ``datasets`` (task -> adaptation dataset): each task's expert is
        ``encoder`` with base + its task vector (pass the untrimmed ones). ``units``: the images
        computed together (the stream's batches; default chunks of ``chunk`` indices);
        ``keep_bytes``: memory for formed expert weights kept between misses."""
        load = lambda task, idx: torch.stack([image_of(datasets[task][i]) for i in idx])
        sizes = {t: len(datasets[t]) for t in tasks}
        self.experts = FeatureCache.experts(encoder, task_vectors, load, sizes, chunk, cache, units, keep_bytes)
        self._adapt = (load, sizes, chunk, units) if cache else None
        self._merged = None

    def expert(self, task: str, indices: torch.Tensor | None, device: torch.device, who: str,
               images: torch.Tensor | None = None) -> torch.Tensor:
        """``task``'s expert features of the batch's images (``images``: the batch in hand, read
        instead of the dataset on a miss); ``who`` names the method in errors."""
        if self.experts is None:
            raise RuntimeError(f"{who} needs the adaptation images: fit it with a MultiTaskDataModule, "
                               "or call use_adaptation_data(datasets) first")
        if indices is None:
            raise ValueError(f"{who} needs each batch as (images, dataset indices), as "
                             "MultiTaskDataModule's stream yields it; got bare images")
        return self.experts(task, indices, device, images)

    def caches_merged(self, indices: Mapping[str, torch.Tensor | None]) -> bool:
        """Whether the merged features of this batch can come from the cache (adaptation data
        known, every task's batch indexed)."""
        return self._adapt is not None and all(i is not None for i in indices.values())

    def merged(self, module: nn.Module, params: Mapping[str, torch.Tensor], images: Mapping[str, torch.Tensor],
               indices: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fixed merge's features of the batch (``module`` with ``params``), once per image."""
        if self._merged is None:
            load, sizes, chunk, units = self._adapt
            self._merged = FeatureCache.fixed(module, params, load, sizes, chunk, units)
        device = next(iter(images.values())).device
        return {t: self._merged(t, indices[t], device, images[t]) for t in images}

    def forget_merged(self) -> None:
        """Drop the merged features (the coefficients changed: restored, or set from a file)."""
        self._merged = None
