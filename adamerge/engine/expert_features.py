"""Features of each task's expert (``base + tau_k``) on the adaptation images, computed once.

Methods that learn from the experts' outputs on unlabeled images (Representation Surgery's
feature distance, Model Tinting's pseudo-labels) need, at every step, the expert of each task on
that task's batch: K extra encoder forwards per step if done naively. The experts are frozen and
the adaptation stream names its images by dataset index, so each image's expert features are
computed once and looked up afterwards.

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


class ExpertFeatures:
    """Cache of expert features per ``(task, image index)``.

    Args:
        encoder: the frozen base encoder (its parameters give ``base``; it is not modified).
        task_vectors: the experts' task vectors (untrimmed: the experts as fine-tuned).
        load_images: ``(task, indices) -> images [n, ...]`` of the adaptation split.
        sizes: task -> number of images in its adaptation split.
        chunk: images per expert forward; the unit of caching.
        cache: keep features (``False`` recomputes the batch's images each call, for benchmarks).
    """

    def __init__(self, encoder: nn.Module, task_vectors: TaskVectors, load_images: ImageLoader,
                 sizes: Mapping[str, int], chunk: int = 64, cache: bool = True) -> None:
        if chunk < 1:
            raise ValueError(f"expert feature chunk must be >= 1, got {chunk}")
        missing = [t for t in task_vectors.task_names if t not in sizes]
        if missing:
            raise ValueError(f"no adaptation data for tasks {missing} (have {list(sizes)})")
        self.encoder, self.task_vectors = encoder, task_vectors
        self.load_images, self.sizes = load_images, dict(sizes)
        self.chunk, self.cache = chunk, cache
        self._chunks: dict[str, dict[int, torch.Tensor]] = {t: {} for t in task_vectors.task_names}
        self.images_computed = 0  # expert forwards done so far, in images
        self.images_served = 0

    @torch.no_grad()
    def expert_parameters(self, task: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The expert's merged parameters ``base + tau_task`` on ``device``."""
        k = self.task_vectors.task_names.index(task)
        params = dict(self.encoder.named_parameters())
        return {n: params[n].detach().to(device) + tau[k].to(device=device, dtype=params[n].dtype)
                for n, tau in zip(self.task_vectors.names, self.task_vectors.tensors)}

    @torch.no_grad()
    def _forward(self, task: str, indices: Sequence[int], params: dict[str, torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        x = self.load_images(task, list(indices)).to(device)
        self.images_computed += len(indices)
        return functional_call(self.encoder, params, (x,), strict=False).detach()

    @torch.no_grad()
    def __call__(self, task: str, indices: torch.Tensor | Sequence[int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """Expert features ``[n, dim]`` of ``task``'s images ``indices``, in that order."""
        device = torch.device(device)
        idx = [int(i) for i in indices]
        n = self.sizes[task]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"task {task!r}: image index {bad[0]} outside its {n} adaptation images")
        self.images_served += len(idx)
        if not self.cache:
            return self._forward(task, idx, self.expert_parameters(task, device), device)
        store = self._chunks[task]
        todo = sorted({i // self.chunk for i in idx} - set(store))
        if todo:
            params = self.expert_parameters(task, device)
            for c in todo:
                store[c] = self._forward(task, range(c * self.chunk, min(n, (c + 1) * self.chunk)),
                                         params, device)
        return torch.stack([store[i // self.chunk][i % self.chunk] for i in idx]).to(device)

    def cached_images(self) -> int:
        """How many images' expert features are held."""
        return sum(int(t.shape[0]) for store in self._chunks.values() for t in store.values())
