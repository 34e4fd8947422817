"""Encoder features of the adaptation images under frozen weights, computed once per image.

Methods that learn from the experts' outputs on unlabeled images (Representation Surgery's
feature distance, Model Tinting's pseudo-labels) need, at every step, the expert of each task on
that task's batch: K extra encoder forwards per step if done naively. The experts are frozen and
the adaptation stream names its images by dataset index, so each image's expert features are
computed once and looked up afterwards (:meth:`FeatureCache.experts`). The same holds for the
merged encoder when its coefficients are fixed (Surgery on a finished merge): its features of an
image never change either (:meth:`FeatureCache.fixed`).

Images are computed in units fixed in advance, whatever batch first asks for one of them: the
adaptation stream's own batches (:meth:`adamerge.data.AdaptationStream.units`: in the first pass
a miss computes exactly the batch in hand, with the images in hand), or, without a stream, fixed
chunks of dataset indices (chunk ``c`` holds ``[c*C, (c+1)*C)``). Either way a resumed run, whose
cache starts empty, recomputes the same units and sees bitwise the features an uninterrupted run
saw.

The experts' weights ``base + tau_k`` are formed when a unit of task ``k`` is computed; they are
kept for the next miss while all kept experts fit in ``keep_bytes`` (forming them again costs a
read of the base and of ``tau_k`` and a write of the expert, about what its forward costs on a
small batch).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .task_vectors import TaskVectors

ImageLoader = Callable[[str, Sequence[int]], torch.Tensor]


ParamsFor = Callable[[str, torch.device], Mapping[str, torch.Tensor]]
Units = Callable[[str, int], Sequence[int]]  # (task, image index) -> the images computed with it

# formed expert weights kept between misses, in bytes (ViT-B/32 x 8 experts: 2.8 GB; ViT-L/14 x 8:
# 9.7 GB, formed again at each miss unless the budget is raised)
KEEP_EXPERT_BYTES = 4 << 30


class FeatureCache:
    """Cache of ``encoder`` features per ``(task, image index)`` under frozen per-task weights.

    Args:
        encoder: the frozen base encoder (called functionally; it is not modified).
        params_for: ``(task, device) -> {name: tensor}``, the weights that task's features use.
        load_images: ``(task, indices) -> images [n, ...]`` of the adaptation split.
        sizes: task -> number of images in its adaptation split.
        chunk: images per forward when no ``units`` are given; the unit of caching then.
        cache: keep features (``False`` recomputes the batch's images each call, for benchmarks).
        units: ``(task, index) -> indices`` computed together (the stream's batches,
            :meth:`adamerge.data.AdaptationStream.units`); default: chunks of ``chunk`` indices.
    """

    def __init__(self, encoder: nn.Module, params_for: ParamsFor, load_images: ImageLoader,
                 sizes: Mapping[str, int], chunk: int = 64, cache: bool = True, units: Units | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"feature cache chunk must be >= 1, got {chunk}")
        self.encoder, self.params_for = encoder, params_for
        self.load_images, self.sizes = load_images, dict(sizes)
        self.chunk, self.cache = chunk, cache
        self.units = units or (lambda task, i: range(i // chunk * chunk, min(self.sizes[task], (i // chunk + 1) * chunk)))
        # task -> image index -> (features of its unit, row in them)
        self._rows: dict[str, dict[int, tuple[torch.Tensor, int]]] = {t: {} for t in sizes}
        self.images_computed = 0  # encoder forwards done so far, in images
        self.images_served = 0
        self.images_loaded = 0  # images read again from the dataset (not taken from the batch in hand)

    @classmethod
    def experts(cls, encoder: nn.Module, task_vectors: TaskVectors, load_images: ImageLoader,
                sizes: Mapping[str, int], chunk: int = 64, cache: bool = True, units: Units | None = None,
                keep_bytes: int = KEEP_EXPERT_BYTES) -> "FeatureCache":
        """Each task's expert, ``base + tau_task`` (pass the untrimmed task vectors); formed
        weights are kept while every kept expert fits in ``keep_bytes`` (0: form at each miss)."""
        missing = [t for t in task_vectors.task_names if t not in sizes]
        if missing:
            raise ValueError(f"no adaptation data for tasks {missing} (have {list(sizes)})")
        kept: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}
        one = sum(t[0].numel() for t in task_vectors.tensors) * next(encoder.parameters()).element_size()

        @torch.no_grad()
        def params_for(task: str, device: torch.device) -> dict[str, torch.Tensor]:
            if (task, device) in kept:
                return kept[(task, device)]
            k = task_vectors.task_names.index(task)
            params = dict(encoder.named_parameters())
            formed = {n: params[n].detach().to(device) + tau[k].to(device=device, dtype=params[n].dtype)
                      for n, tau in zip(task_vectors.names, task_vectors.tensors)}
            if (len(kept) + 1) * one <= keep_bytes:
                kept[(task, device)] = formed
            return formed
        return cls(encoder, params_for, load_images, sizes, chunk, cache, units)

    @classmethod
    def fixed(cls, encoder: nn.Module, params: Mapping[str, torch.Tensor], load_images: ImageLoader,
              sizes: Mapping[str, int], chunk: int = 64, units: Units | None = None) -> "FeatureCache":
        """One set of weights for every task (a merge whose coefficients do not train)."""
        return cls(encoder, lambda task, device: params, load_images, sizes, chunk, units=units)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.images_computed += int(x.shape[0])
        return functional_call(self.encoder, dict(params), (x,), strict=False).detach()

    @torch.no_grad()
    def __call__(self, task: str, indices: torch.Tensor | Sequence[int],
                 device: torch.device | str = "cpu", images: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``[n, dim]`` of ``task``'s images ``indices``, in that order. ``images``: the
        batch in hand (those images, in that order), used instead of reading a unit again when
        the unit is the batch itself."""
        device = torch.device(device)
        idx = [int(i) for i in indices]
        n = self.sizes[task]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"task {task!r}: image index {bad[0]} outside its {n} adaptation images")
        self.images_served += len(idx)
        if not self.cache:
            return self._forward(self._images(task, idx, idx, images, device), self.params_for(task, device))
        rows = self._rows[task]
        for i in idx:
            if i in rows:
                continue
            unit = [int(j) for j in self.units(task, i)]
            feats = self._forward(self._images(task, unit, idx, images, device), self.params_for(task, device))
            for r, j in enumerate(unit):
                rows[j] = (feats, r)
        if len({id(rows[i][0]) for i in idx}) == 1:  # the whole batch from one unit: one gather
            feats = rows[idx[0]][0]
            return feats[torch.tensor([rows[i][1] for i in idx], device=feats.device)].to(device)
        return torch.stack([rows[i][0][rows[i][1]] for i in idx]).to(device)

    def _images(self, task: str, unit: list[int], idx: list[int], images: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
        if images is not None and unit == idx:
            return images.to(device)
        self.images_loaded += len(unit)
        return self.load_images(task, unit).to(device)

    def cached_images(self) -> int:
        """How many images' features are held."""
        return sum(len(rows) for rows in self._rows.values())
