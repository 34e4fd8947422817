"""Fisher merging (Matena & Raffel, NeurIPS 2022), as FusionBench runs it on CLIP: a fitted row.

Each expert's diagonal empirical Fisher ``F_k`` is estimated on a few batches of its task's
unlabeled adaptation images, then every merged parameter is the Fisher-weighted average of the
experts, ``theta = sum_k c_k (F_k + eps) theta_k / sum_k c_k (F_k + eps)``.

Source: tanganke/fusion_bench @54c9e8c.

* ``fusion_bench/method/fisher_merging/clip_fisher_merging.py`` L138-183 (the Fisher of one
  expert): the expert's logits on a batch of its task's images (no labels used), ``p =
  softmax(logits)`` detached, the gradient of ``sum_batch sum_class sqrt(p) * log_softmax(logits)``
  squared (the batch's gradient, not per-image gradients; L151-164), summed over batches and
  divided by the number of images seen (L171, L182-183); batches until at least
  ``num_fisher_examples`` images (L143), in dataset order (``DataLoader`` without shuffle, L126).
* ``fusion_bench/method/fisher_merging/fisher_merging.py`` L110-189 (the merge): ``eps``
  (``minimal_fisher_weight``) added to every Fisher (L146-155); with ``normalize_fisher_weight``
  each expert's coefficient ``1/K`` is scaled by ``1 / (|F_k| + eps)`` normalised to sum 1, ``|F_k|``
  the L2 norm of its whole Fisher (all merged parameters; L68-107, L162-173); ``numerator /
  denominator`` (L176-187); every parameter of the encoder is merged (empty
  ``exclude_param_names_regex``).
* ``config/method/fisher_merging/clip_fisher_merging.yaml`` L3-11: ``normalize_fisher_weight:
  true``, ``minimal_fisher_weight: 1e-6``, ``num_fisher_examples: 256``, batch size 32.

Ours: the same statistics and merge, with these differences (docs/fidelity.md): the images are
the task's adaptation split (``test`` by default; FusionBench reads the train split), a seeded
random draw of ``num_examples`` of them (``seed``; FusionBench takes the first ones in order); the
merge is streamed over the experts (the normalisation's ``1 / sum_j`` is common to the numerator
and the denominator and cancels, so each expert's term is added as soon as its Fisher is known:
two model-sized buffers instead of K Fishers); a parameter the logits do not depend on has Fisher
0 (FusionBench would fail on its missing gradient).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, Subset

# FusionBench's CLIP config (config/method/fisher_merging/clip_fisher_merging.yaml L9, L11): 256 images, batches of 32
NUM_EXAMPLES = 256
BATCH_SIZE = 32


def adaptation_batches(dataset: Dataset, num_examples: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Batches of images (labels dropped) of ``dataset``: ``num_examples`` of them drawn at random
    (a permutation seeded with ``seed``; all of them when the dataset is smaller), in batches of
    ``batch_size`` (the last one smaller when ``batch_size`` does not divide the count)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"num_examples and batch_size must be >= 1, got {num_examples} and {batch_size}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the adaptation dataset is empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(n, num_examples)]
    for batch in DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False):
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def dense_task_vectors(loaded: Any) -> Any:
    """The pool's task vectors, dense (LoRA pools give low-rank ones)."""
    tv = loaded.task_vectors
    return tv.to_dense() if hasattr(tv, "to_dense") else tv


def expert_params(encoder: nn.Module, tv: Any, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Expert ``k``'s merged parameters, ``base + tau_k`` (the others stay the encoder's)."""
    params = dict(encoder.named_parameters())
    return {n: params[n].detach().to(device) + tau[k].to(device=device, dtype=params[n].dtype)
            for n, tau in zip(tv.names, tv.tensors)}


def check_data(tasks: Sequence[str], data: Mapping[str, Dataset], method: str) -> None:
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"{method}: no adaptation data for tasks {missing} (have {list(data)})")


def fisher_diagonal(encoder: nn.Module, head: nn.Module, params: Mapping[str, torch.Tensor],
                    batches: Iterator[torch.Tensor]) -> dict[str, torch.Tensor]:
    """FusionBench's empirical Fisher of one expert (``clip_fisher_merging.py`` L138-183): per batch
    the squared gradient of ``sum sqrt(p).detach() * log_softmax(logits)``, summed over batches,
    divided by the number of images. Parameters the logits do not reach get 0."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in leaves.items()}
    device = next(iter(leaves.values())).device if leaves else torch.device("cpu")
    seen = 0
    for x in batches:
        x = x.to(device)
        logits = head(functional_call(encoder, leaves, (x,), strict=False))
        p = torch.softmax(logits, dim=-1).detach()
        objective = (p.sqrt() * torch.log_softmax(logits, dim=-1)).sum()
        grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
        for n, g in zip(leaves, grads):
            if g is not None:
                fisher[n] += g.detach() ** 2
        seen += int(x.shape[0])
    if seen == 0:
        raise ValueError("no images to estimate the Fisher on")
    return {n: f / seen for n, f in fisher.items()}


def fisher_average(thetas: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                   normalize: bool = True, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """``sum_k c_k (F_k + eps) theta_k / sum_k c_k (F_k + eps)`` per parameter from all K Fishers at
    once, as FusionBench's ``merging_with_fisher_weights`` (``fisher_merging.py`` L110-189) with
    equal scaling coefficients: ``c_k = 1/K``, times ``(1 / (|F_k| + eps)) / sum_j (1 / (|F_j| + eps))``
    with ``normalize`` (``|F_k|``: L2 norm over all of expert k's Fisher). :func:`fisher` streams
    the same sum (:class:`FisherAccumulator`)."""
    if len(thetas) != len(fishers) or not thetas:
        raise ValueError(f"need one Fisher per expert, got {len(thetas)} experts and {len(fishers)} Fishers")
    K = len(thetas)
    c = torch.full((K,), 1.0 / K, dtype=torch.float64)
    if normalize:
        norms = torch.stack([torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f[n].double())
                                                                   for n in f])) for f in fishers])
        inv = 1.0 / (norms + eps)
        c = c * inv / inv.sum()
    out = {}
    for n in thetas[0]:
        theta = torch.stack([t[n] for t in thetas])
        f = torch.stack([fi[n] for fi in fishers]).to(theta.dtype) + eps
        ck = c.to(theta.dtype).reshape(-1, *[1] * (theta.dim() - 1))
        out[n] = (ck * f * theta).sum(0) / (ck * f).sum(0)
    return out


class FisherAccumulator:
    """The Fisher-weighted average built one expert at a time. Each expert's coefficient
    ``c_k`` is proportional to ``1 / (|F_k| + eps)`` (``normalize``) or constant; the common factor
    (``1 / K`` and the normalisation's ``1 / sum_j``) cancels in ``numerator / denominator``."""

    def __init__(self, normalize: bool = True, eps: float = 1e-6) -> None:
        self.normalize, self.eps = normalize, eps
        self.num: dict[str, torch.Tensor] = {}
        self.den: dict[str, torch.Tensor] = {}

    def add(self, theta: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor]) -> None:
        if set(theta) != set(fisher):
            raise ValueError("an expert's parameters and Fisher name different tensors")
        c = 1.0
        if self.normalize:
            norm = math.sqrt(sum(float(torch.linalg.vector_norm(f.double())) ** 2 for f in fisher.values()))
            c = 1.0 / (norm + self.eps)
        for n, t in theta.items():
            w = c * (fisher[n].to(t.dtype) + self.eps)
            if n in self.num:
                self.num[n] += w * t
                self.den[n] += w
            else:
                self.num[n], self.den[n] = w * t, w.clone()

    def result(self) -> dict[str, torch.Tensor]:
        return {n: self.num[n] / self.den[n] for n in self.num}


def fisher(loaded: Any, data: Mapping[str, Dataset], num_examples: int = NUM_EXAMPLES, batch_size: int = BATCH_SIZE,
           normalize: bool = True, eps: float = 1e-6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fisher merging of the pool's experts, each Fisher on ``num_examples`` (256) unlabeled images of
    its task's adaptation data in batches of ``batch_size`` (32).

    Args:
        loaded: the pool (``LoadedPool``: encoder, task vectors, heads).
        data: task -> its adaptation dataset (``(image, ...)`` items; labels are not read).
        num_examples: images per task (FusionBench ``num_fisher_examples``: 256).
        batch_size: images per Fisher batch (FusionBench: 32); the Fisher squares each batch's gradient.
        normalize: scale each expert by the inverse L2 norm of its Fisher (``normalize_fisher_weight``).
        eps: added to every Fisher entry and norm (``minimal_fisher_weight``: 1e-6).
        seed: which images are drawn.
    Returns:
        merged parameter name -> tensor (the pool's merged parameters; the others keep the base).
    """
    encoder, tv = loaded.encoder, dense_task_vectors(loaded)
    check_data(tv.task_names, data, "fisher")
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    acc = FisherAccumulator(normalize, eps)
    try:
        for k, task in enumerate(tv.task_names):
            theta = expert_params(encoder, tv, k, device)
            f = fisher_diagonal(encoder, loaded.heads[task], theta,
                                adaptation_batches(data[task], num_examples, batch_size, seed))
            acc.add(theta, f)
            del f
    finally:
        encoder.train(was_training)
    return {n: t.detach() for n, t in acc.result().items()}
