"""Encoder features of the adaptation images under frozen weights, computed once per image.

Methods that learn from the experts' outputs on unlabeled images (Representation Surgery's
feature distance, Model Tinting's pseudo-labels) need, at every step, the expert of each task on
that task's batch: K extra encoder forwards per step if done naively. The experts are frozen and
the adaptation stream names its images by dataset index, so each image's expert features are
computed once and looked up afterwards (:meth:`FeatureCache.experts`). The same holds for the
merged encoder when its coefficients are fixed (Surgery on a finished merge): its features of an
image never change either (:meth:`FeatureCache.fixed`).

Images are computed in fixed chunks of dataset indices (chunk ``c`` holds ``[c*C, (c+1)*C)``):
whatever batch first asks for an image, its features come from the same forward, so a resumed
run sees bitwise the features an uninterrupted one saw.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .task_vectors import TaskVectors

ImageLoader = Callable[[str, Sequence[int]], torch.Tensor]


ParamsFor = Callable[[str, torch.device], Mapping[str, torch.Tensor]]


class FeatureCache:
    """Cache of ``encoder`` features per ``(task, image index)`` under frozen per-task weights.

    Args:
        encoder: the frozen base encoder (called functionally; it is not modified).
        params_for: ``(task, device) -> {name: tensor}``, the weights that task's features use.
        load_images: ``(task, indices) -> images [n, ...]`` of the adaptation split.
        sizes: task -> number of images in its adaptation split.
        chunk: images per forward; the unit of caching.
        cache: keep features (``False`` recomputes the batch's images each call, for benchmarks).
    """

    def __init__(self, encoder: nn.Module, params_for: ParamsFor, load_images: ImageLoader,
                 sizes: Mapping[str, int], chunk: int = 64, cache: bool = True) -> None:
        if chunk < 1:
            raise ValueError(f"feature cache chunk must be >= 1, got {chunk}")
        self.encoder, self.params_for = encoder, params_for
        self.load_images, self.sizes = load_images, dict(sizes)
        self.chunk, self.cache = chunk, cache
        self._chunks: dict[str, dict[int, torch.Tensor]] = {t: {} for t in sizes}
        self.images_computed = 0  # encoder forwards done so far, in images
        self.images_served = 0

    @classmethod
    def experts(cls, encoder: nn.Module, task_vectors: TaskVectors, load_images: ImageLoader,
                sizes: Mapping[str, int], chunk: int = 64, cache: bool = True) -> "FeatureCache":
        """Each task's expert, ``base + tau_task`` (pass the untrimmed task vectors)."""
        missing = [t for t in task_vectors.task_names if t not in sizes]
        if missing:
            raise ValueError(f"no adaptation data for tasks {missing} (have {list(sizes)})")

        @torch.no_grad()
        def params_for(task: str, device: torch.device) -> dict[str, torch.Tensor]:
            k = task_vectors.task_names.index(task)
            params = dict(encoder.named_parameters())
            return {n: params[n].detach().to(device) + tau[k].to(device=device, dtype=params[n].dtype)
                    for n, tau in zip(task_vectors.names, task_vectors.tensors)}
        return cls(encoder, params_for, load_images, sizes, chunk, cache)

    @classmethod
    def fixed(cls, encoder: nn.Module, params: Mapping[str, torch.Tensor], load_images: ImageLoader,
              sizes: Mapping[str, int], chunk: int = 64) -> "FeatureCache":
        """One set of weights for every task (a merge whose coefficients do not train)."""
        return cls(encoder, lambda task, device: params, load_images, sizes, chunk)

    @torch.no_grad()
    def _forward(self, task: str, indices: Sequence[int], params: dict[str, torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        x = self.load_images(task, list(indices)).to(device)
        self.images_computed += len(indices)
        return functional_call(self.encoder, params, (x,), strict=False).detach()

    @torch.no_grad()
    def __call__(self, task: str, indices: torch.Tensor | Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """Features ``[n, dim]`` of ``task``'s images ``indices``, in that order."""
        device = torch.device(device)
        idx = [int(i) for i in indices]
        n = self.sizes[task]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"task {task!r}: image index {bad[0]} outside its {n} adaptation images")
        self.images_served += len(idx)
        if not self.cache:
            return self._forward(task, idx, dict(self.params_for(task, device)), device)
        store = self._chunks[task]
        todo = sorted({i // self.chunk for i in idx} - set(store))
        if todo:
            params = dict(self.params_for(task, device))
            for c in todo:
                store[c] = self._forward(task, range(c * self.chunk, min(n, (c + 1) * self.chunk)),
                                         params, device)
        return torch.stack([store[i // self.chunk][i % self.chunk] for i in idx]).to(device)

    def cached_images(self) -> int:
        """How many images' features are held."""
        return sum(int(t.shape[0]) for store in self._chunks.values() for t in store.values())
