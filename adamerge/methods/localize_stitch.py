"""Localize-and-Stitch (He et al., 2024, arXiv 2408.13656): a fitted row.

Localize: for each task a real-valued mask ``S_k`` over every entry of its task vector ``tau_k``
(all merged parameters at once), initialised to ``+sigmoid_bias`` on the ``sparsity`` fraction of
entries of largest ``|tau_k|`` and ``-sigmoid_bias`` elsewhere. Each epoch the model
``base + sigmoid(S_k) * tau_k`` is run over the task's few labeled images (cross-entropy through the
task's frozen head); the gradients w.r.t. the weights, times ``tau_k`` and ``lr``, are averaged over
the batches, and one step ``S_k -= g * sigmoid'(S_k) - l1_strength * sign(S_k) * sigmoid'(S_k)`` is
taken. The binary mask is ``round(sigmoid(S_k))``. ``dataless``: the mask is the initial one (the
top ``sparsity`` magnitudes), no data read.

Stitch: ``theta = base + sum_k m_k * tau_k / c``, ``c`` the number of tasks whose mask covers the
entry (0 where none does: the base value).

Sources (defaults from the authors' vision script; MergeBench's LLM values in docs/fidelity.md):

* uiuctml/Localize-and-Stitch @109d206 ``localize_utils.py``: ``create_basepatch`` L78-100 (global
  top-k of ``|tau|`` over all parameters, ``+/-sigmoid_bias``), ``interpolate_model`` L103-135
  (``sigmoid(S)``, rounded for the final mask), ``train_graft`` L184-256 (per epoch: the
  un-rounded interpolated model, CE per batch, ``lr * grad * tau`` summed and divided by the
  number of batches L218-228, the step L232-237), ``Stitcher.get_average_masks`` L273-296 and
  ``interpolate_models`` L299-321 (``m_i / (1 + sum_{j != i} m_i AND m_j)``).
* ``vision/src/main_localize_stitch.py`` L48 (``n_shot = 64``), L55 (``sigmoid_bias = 5``), L56
  (batch 128), L57 (``l1_strength = 1``), L58 (``learning_rate = 1e7``), L59 (``num_train_epochs =
  10``), L60 (``sparsity = 1e-5``); ``vision/src/vision_datasets/registry.py`` L35-72
  (``create_k_shot_dataset``: 64 per class of the train split, shuffled, capped at 1024).
* ``vision/src/main_dataless_localize_stitch.py`` L50-51: dataless, sparsity 0.1, sigmoid_bias 5.
* uiuctml/MergeBench @b245648 ``merging/merging_methods/localize_utils.py`` L44-61, L90-177,
  L180-223 (the same rules for LLMs), ``merging/prepare_args.py`` L19-25 (sigmoid_bias 3, sparsity
  0.1, lr 1e8, 1 epoch, l1 0, trained unless ``--dataless``).

Ours (docs/fidelity.md): the registry row fits on 64 labeled train images per class of each task
(its ``data``: ``shots: 64, shots_split: train``, drawn with a seed; the official code takes the
first 64 per class of the train split), never on the evaluated split; called directly, the row
draws ``shots`` per class from whatever datasets it is given. The initial mask keeps exactly
``int(sparsity * n)`` entries (official: ``|tau| > threshold``, one fewer); the batches are seeded.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.datamodule import few_shot_indices, labels_of
from .fisher import check_data, dense_task_vectors

# uiuctml/Localize-and-Stitch vision/src/main_localize_stitch.py L48, L55-60; vision_datasets/registry.py L35
SHOTS, SIGMOID_BIAS, BATCH_SIZE, L1_STRENGTH, LR, EPOCHS, SPARSITY, DATA_CAP = 64, 5.0, 128, 1.0, 1e7, 10, 1e-5, 1024


def initial_mask(taus: Sequence[torch.Tensor], sparsity: float, sigmoid_bias: float) -> list[torch.Tensor]:
    """``create_basepatch``: ``+sigmoid_bias`` on the ``int(sparsity * n)`` entries of largest
    ``|tau|`` over all tensors together, ``-sigmoid_bias`` elsewhere (float32 logits)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"localize_stitch: sparsity must be in [0, 1], got {sparsity}")
    flat = torch.cat([t.detach().abs().reshape(-1).float() for t in taus])
    k = int(sparsity * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k).indices] = True
    logits = torch.where(keep, torch.tensor(float(sigmoid_bias), device=flat.device),
                         torch.tensor(-float(sigmoid_bias), device=flat.device))
    return [part.reshape(t.shape).clone() for part, t in zip(logits.split([t.numel() for t in taus]), taus)]


def binary_mask(logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``round(sigmoid(S))`` as booleans (``interpolate_model(round_=True)``)."""
    return [torch.round(torch.sigmoid(s)).bool() for s in logits]


def shot_batches(dataset: Dataset, task: str, shots: int, batch_size: int, data_cap: int, seed: int,
                 epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``shots`` labeled items per class of ``dataset`` (a seeded draw), at most ``data_cap`` of them
    (a seeded shuffle first, as ``create_k_shot_dataset``), in a per-epoch seeded order, as
    ``(images, labels)`` batches of ``batch_size``."""
    if shots < 1 or batch_size < 1 or data_cap < 1:
        raise ValueError(f"localize_stitch: shots, batch_size and data_cap must be >= 1, got "
                         f"{shots}, {batch_size}, {data_cap}")
    task_seed = seed * 1_000_003 + zlib.crc32(task.encode())
    idx = few_shot_indices(labels_of(dataset), shots, task_seed, name=f"localize_stitch task {task!r}")
    g = torch.Generator().manual_seed(task_seed)
    idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()][:data_cap]
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(task_seed + 1 + epoch)).tolist()
    for batch in DataLoader(Subset(dataset, [idx[i] for i in order]), batch_size=batch_size, shuffle=False):
        yield batch[0], batch[1]


def train_mask(encoder: nn.Module, head: nn.Module, names: Sequence[str], base: Sequence[torch.Tensor],
               taus: Sequence[torch.Tensor], logits: list[torch.Tensor], batches_of_epoch: Any, epochs: int,
               lr: float, l1_strength: float) -> list[torch.Tensor]:
    """``train_graft`` (L184-256): per epoch, CE of ``head(encoder)`` at ``base + sigmoid(S) * tau``
    over the epoch's batches, ``g = mean_batches(lr * grad * tau)``, then
    ``S -= g * sigmoid'(S) - l1_strength * where(S > 0, sigmoid'(S), -sigmoid'(S))``."""
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        with torch.no_grad():
            weights = {n: (b + torch.sigmoid(s).to(b.dtype) * t).requires_grad_(True)
                       for n, b, t, s in zip(names, base, taus, logits)}
        total = [torch.zeros_like(s) for s in logits]
        n_batches = 0
        for x, y in batches_of_epoch(epoch):
            x, y = x.to(base[0].device), y.to(base[0].device)
            loss = loss_fn(head(functional_call(encoder, weights, (x,), strict=False)), y.long())
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for acc, g, t in zip(total, grads, taus):
                if g is not None:
                    acc += (lr * g.detach() * t).to(acc.dtype)
            n_batches += 1
        if n_batches == 0:
            raise ValueError("localize_stitch: no labeled images to train the mask on")
        with torch.no_grad():
            for s, g in zip(logits, total):
                g /= n_batches
                d = torch.sigmoid(s) * (1 - torch.sigmoid(s))
                s -= g * d - l1_strength * torch.where(s > 0, d, -d)
    return logits


class Stitcher:
    """The official ``Stitcher``, streamed over the tasks: :meth:`add` one task's task vector and
    binary mask at a time (only the running sums are kept, never the K masks), :meth:`result` gives
    ``base + sum_k m_k tau_k / c`` per entry, ``c = sum_k m_k`` (the base where ``c = 0``)."""

    def __init__(self, base: Mapping[str, torch.Tensor]) -> None:
        self.base = dict(base)
        self.num = {n: torch.zeros_like(b) for n, b in self.base.items()}
        self.count = {n: torch.zeros_like(b) for n, b in self.base.items()}

    def add(self, tau: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> None:
        for n, b in self.base.items():
            m = mask[n].to(b.dtype)
            self.num[n] += m * tau[n].to(b.dtype)
            self.count[n] += m

    def result(self) -> dict[str, torch.Tensor]:
        return {n: b + torch.where(self.count[n] > 0, self.num[n] / self.count[n].clamp(min=1),
                                   torch.zeros_like(b)) for n, b in self.base.items()}


def stitch(base: Mapping[str, torch.Tensor], taus: Sequence[Mapping[str, torch.Tensor]],
           masks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``Stitcher``: ``base + sum_k m_k tau_k / c`` per entry, ``c = sum_k m_k`` (0 where c = 0)."""
    stitcher = Stitcher(base)
    for tau, m in zip(taus, masks):
        stitcher.add(tau, m)
    return stitcher.result()


def localize_stitch(loaded: Any, data: Mapping[str, Dataset], sparsity: float = SPARSITY,
                    sigmoid_bias: float = SIGMOID_BIAS, lr: float = LR, epochs: int = EPOCHS,
                    l1_strength: float = L1_STRENGTH, shots: int = SHOTS, batch_size: int = BATCH_SIZE,
                    data_cap: int = DATA_CAP, dataless: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Localize-and-Stitch of the pool's experts: a mask per task learned on ``shots`` labeled images
    per class of its adaptation data, stitched.

    Args:
        loaded: the pool (``LoadedPool``: encoder, task vectors, heads).
        data: task -> its adaptation dataset of ``(image, label)`` items (labels are read).
        sparsity: fraction of entries of each task vector the initial mask keeps (official vision
            script: 1e-5; dataless script and MergeBench: 0.1).
        sigmoid_bias: initial logit magnitude (5; MergeBench 3).
        lr: mask learning rate (1e7; MergeBench 1e8).
        epochs: mask steps, one per pass over the shots (10; MergeBench 1).
        l1_strength: the official regulariser's weight (1; MergeBench 0).
        shots: labeled images per class (64); ``data_cap``: at most this many per task (1024).
        batch_size: images per gradient batch (128).
        dataless: masks = the top ``sparsity`` magnitudes, no data read (the authors' dataless
            script; MergeBench ``--dataless``).
        seed: which images are drawn and their order.
    Returns:
        merged parameter name -> tensor.
    """
    encoder, tv = loaded.encoder, dense_task_vectors(loaded)
    if not dataless:
        check_data(tv.task_names, data, "localize_stitch")
        if epochs < 0:
            raise ValueError(f"localize_stitch: epochs must be >= 0, got {epochs}")
    device = next(encoder.parameters()).device
    params = dict(encoder.named_parameters())
    names = list(tv.names)
    base = [params[n].detach().to(device) for n in names]
    was_training = encoder.training
    encoder.eval()
    stitcher = Stitcher(dict(zip(names, base)))
    try:
        for k, task in enumerate(tv.task_names):
            taus = [t[k].to(device=device, dtype=b.dtype) for t, b in zip(tv.tensors, base)]
            logits = initial_mask(taus, sparsity, sigmoid_bias)
            if not dataless and epochs > 0:
                def batches_of_epoch(epoch: int, task: str = task):
                    return shot_batches(data[task], task, shots, batch_size, data_cap, seed, epoch)
                logits = train_mask(encoder, loaded.heads[task], names, base, taus, logits, batches_of_epoch,
                                    epochs, lr, l1_strength)
            stitcher.add(dict(zip(names, taus)), dict(zip(names, binary_mask(logits))))
            del logits, taus
    finally:
        encoder.train(was_training)
    return stitcher.result()
