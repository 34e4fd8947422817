"""RegMean (Jin et al., ICLR 2023), as FusionBench runs it on CLIP: a fitted row; RegMean++ below
(:func:`regmean_plusplus`).

Each linear layer's merged weight solves the regression of every expert's outputs on its own
task's inputs: with ``G_k = X_k^T X_k / n_k`` the Gram matrix of the layer's inputs under expert
``k`` on its task's images, off-diagonal entries scaled by ``alpha``, ``W^T = (sum_k G_k)^-1 sum_k G_k
W_k^T`` (``nn.Linear`` keeps ``W`` as ``[out, in]``: the transpose). Every other tensor is the
experts' mean.

Source: tanganke/fusion_bench @54c9e8c.

* ``fusion_bench/method/regmean/clip_regmean.py`` L50-128 (the Grams of one expert): forward hooks
  on every ``nn.Linear`` module of the expert (``utils.py`` L33-56), inputs flattened to ``[batch *
  tokens, in]``, ``X^T X`` averaged over all rows seen (L72-92: a running mean over tokens); the
  expert run on its task's images (logits computed, labels unused, L119) in shuffled batches
  (L59-61) until at least ``num_regmean_examples`` images (L114-118).
* ``fusion_bench/method/regmean/regmean.py`` L24-40 (``reduce_non_diagonal_elements``: diagonal
  kept, the rest times the ratio), L43-120 (the merge: only ``.weight`` of a hooked module,
  ``inverse(sum G) @ sum G W^T``, transposed back; every other parameter, biases included, the
  plain mean of the experts, L116-118).
* ``config/method/regmean/clip_regmean.yaml`` L6-13: ``num_regmean_examples: 256``,
  ``weight_transpose: true``, ``reduce_non_diagonal_ratio: 0.95``, batch size 32 (the base
  ``regmean.yaml`` L6 has 0.1, ``gpt2_regmean.yaml`` L10 0.6; we take the CLIP one).

Ours (docs/fidelity.md): the images are the task's adaptation split (``test`` by default;
FusionBench reads the train split), a seeded random draw of ``num_examples``; the Grams summed in
float64 over the batch and divided once (the same mean as the running one); the sums over experts
kept instead of the K Grams (``sum_k G_k`` and ``sum_k G_k W_k^T`` per layer); the system solved in
float64 (``torch.linalg.solve``; FusionBench inverts in float32). A linear layer whose forward does
not run as a module call (the ``out_proj`` of ``nn.MultiheadAttention``, which open_clip uses: its
weights are read inside the attention function) gets no Gram and is averaged, as in FusionBench;
so is a layer whose weight is not a merged parameter of the pool.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from .fisher import adaptation_batches, check_data, dense_task_vectors, expert_params

# FusionBench's CLIP config (config/method/regmean/clip_regmean.yaml L8, L11, L13)
NUM_EXAMPLES = 256
BATCH_SIZE = 32
ALPHA = 0.95


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``gram`` with its diagonal kept and every other entry times ``alpha``
    (FusionBench ``reduce_non_diagonal_elements``, ``regmean.py`` L24-40)."""
    eye = torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return torch.where(eye, gram, gram * alpha)


def input_grams(encoder: nn.Module, params: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module],
                calls: Iterable[tuple[tuple, dict]]) -> dict[str, torch.Tensor]:
    """``X^T X / rows`` (float64) of the inputs of each module in ``modules`` (name -> submodule of
    ``encoder``) while ``encoder`` runs with ``params`` on each ``(args, kwargs)`` of ``calls``;
    modules never called are left out."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            xtx = x.T @ x
            if name in sums:
                sums[name] += xtx
                rows[name] += x.shape[0]
            else:
                sums[name], rows[name] = xtx, x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                functional_call(encoder, dict(params), args, kwargs, strict=False)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / rows[n] for n in sums}


def image_calls(batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[tuple[tuple, dict]]:
    """``((images,), {})`` per batch: the encoder's calls on them."""
    for x in batches:
        yield (x.to(device),), {}


def regmean_solve(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The RegMean weight ``[out, in]`` of one linear layer from each expert's input Gram ``[in, in]``
    and weight ``[out, in]``: ``(sum_k G_k')^-1 sum_k G_k' W_k^T``, transposed back (float64)."""
    lhs = rhs = None
    for g, w in zip(grams, weights):
        g = scale_off_diagonal(g.double(), alpha)
        lhs = g if lhs is None else lhs + g
        rhs = g @ w.double().T if rhs is None else rhs + g @ w.double().T
    return torch.linalg.solve(lhs, rhs).T


def linear_modules(encoder: nn.Module, merged: set[str]) -> dict[str, nn.Module]:
    """The ``nn.Linear`` modules of ``encoder`` whose weight is a merged parameter (by module name)."""
    return {n: m for n, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and (f"{n}.weight" if n else "weight") in merged}


def regmean(loaded: Any, data: Mapping[str, Dataset], num_examples: int = NUM_EXAMPLES, batch_size: int = BATCH_SIZE,
            alpha: float = ALPHA, seed: int = 0) -> dict[str, torch.Tensor]:
    """RegMean over the pool's experts, each layer's Gram on ``num_examples`` (256) unlabeled images of
    each task's adaptation data.

    Args:
        loaded: the pool (``LoadedPool``).
        data: task -> its adaptation dataset (``(image, ...)`` items; labels are not read).
        num_examples: images per task (FusionBench ``num_regmean_examples``: 256).
        batch_size: images per forward (32; the Grams do not depend on it).
        alpha: factor of the Grams' off-diagonal entries (``reduce_non_diagonal_ratio``: 0.95 for
            CLIP; 1 is the exact least squares, 0 a per-input-feature weighted mean).
        seed: which images are drawn.
    Returns:
        merged parameter name -> tensor: RegMean for the linear layers' weights, the experts' mean
        for every other merged parameter.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean: alpha must be in [0, 1], got {alpha}")
    encoder, tv = loaded.encoder, dense_task_vectors(loaded)
    check_data(tv.task_names, data, "regmean")
    device = next(encoder.parameters()).device
    base = dict(encoder.named_parameters())
    modules = linear_modules(encoder, set(tv.names))
    # per layer: sum_k G_k' and sum_k G_k' W_k^T (float64), added one expert at a time
    lhs: dict[str, torch.Tensor] = {}
    rhs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    was_training = encoder.training
    encoder.eval()
    try:
        for k, task in enumerate(tv.task_names):
            theta = expert_params(encoder, tv, k, device)
            grams = input_grams(encoder, theta, modules,
                                image_calls(adaptation_batches(data[task], num_examples, batch_size, seed), device))
            for name, g in grams.items():
                g = scale_off_diagonal(g, alpha)
                w = theta[f"{name}.weight" if name else "weight"].double()
                if name in lhs:
                    lhs[name] += g
                    rhs[name] += g @ w.T
                else:
                    lhs[name], rhs[name] = g, g @ w.T
                counts[name] = counts.get(name, 0) + 1
            del theta, grams
    finally:
        encoder.train(was_training)
    K = len(tv.task_names)
    out = {}
    for n, tau in zip(tv.names, tv.tensors):
        p = base[n].detach()
        out[n] = p + tau.to(device=device, dtype=p.dtype).mean(0)  # the experts' mean
    for name in lhs:
        if counts[name] != K:  # a layer some experts never ran: the mean, as for unhooked layers
            continue
        key = f"{name}.weight" if name else "weight"
        out[key] = torch.linalg.solve(lhs[name], rhs[name]).T.to(base[key].dtype)
    return out


class _BlockReached(Exception):
    """Stops the encoder's forward at the block whose input is being captured."""


def block_inputs(encoder: nn.Module, params: Mapping[str, torch.Tensor], block: str,
                 batches: Iterable[torch.Tensor], device: torch.device) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` block ``block`` of ``encoder`` is called with when the encoder runs with
    ``params`` on each batch (the forward stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _BlockReached

    handle = encoder.get_submodule(block).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    functional_call(encoder, dict(params), (x.to(device),), strict=False)
                except _BlockReached:
                    continue
                raise ValueError(f"regmean_plusplus: block {block!r} is not called by the encoder's forward")
    finally:
        handle.remove()
    return captured


def regmean_plusplus(loaded: Any, data: Mapping[str, Dataset], num_examples: int = NUM_EXAMPLES,
                     batch_size: int = BATCH_SIZE, alpha: float = ALPHA, seed: int = 0) -> dict[str, torch.Tensor]:
    """RegMean++ (Nguyen et al., 2025): RegMean one transformer block at a time, each block's Grams
    taken on the inputs the *merged* blocks before it give (each expert's block run on them), so
    the statistics follow the merged model rather than each expert's own path.

    FusionBench ``fusion_bench/method/regmean_plusplus/regmean_plusplus.py`` L164-311: the embedding
    layer merged first (the mean, ``clip_regmean_plusplus.py`` L119-141), each task's images through
    it (L143-173), then per layer ``l``: each expert's layer ``l`` run on every task's current inputs
    with hooks on its ``nn.Linear`` modules (L220-273, ``clip_regmean_plusplus.py`` L54-117), RegMean
    merge of the layer (L37-139, the same rule as RegMean), the current inputs sent through the
    *merged* layer ``l`` (L291-305); ``config/method/regmean_plusplus/clip_regmean_plusplus.yaml``
    L6-13: 256 images, 0.95, batch 32.

    Ours: the blocks are the pool layout's (``loaded.layout.blocks``); the first block's input is
    captured by running the encoder with the merged parameters up to it (a forward pre-hook; the
    encoder's own code before it, masks and keyword arguments included), each later block's from
    the merged block before it run on that block's inputs, as FusionBench does, where one batch
    shows that this is what the encoder feeds it (:func:`next_block_inputs`; otherwise the encoder
    is run up to that block); every parameter outside the blocks is the experts' mean (FusionBench: embeddings
    and pre-norm the mean, the final norm left at the pretrained value, the projection not merged).
    Arguments as :func:`regmean`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean_plusplus: alpha must be in [0, 1], got {alpha}")
    encoder, tv = loaded.encoder, dense_task_vectors(loaded)
    check_data(tv.task_names, data, "regmean_plusplus")
    blocks = tuple(getattr(getattr(loaded, "layout", None), "blocks", ()) or ())
    if not blocks:
        raise ValueError("regmean_plusplus: the pool's layout names no transformer blocks (loaded.layout.blocks)")
    device = next(encoder.parameters()).device
    base = dict(encoder.named_parameters())
    K = len(tv.task_names)
    taus = dict(zip(tv.names, tv.tensors))
    merged = {n: base[n].detach() + taus[n].to(device=device, dtype=base[n].dtype).mean(0) for n in tv.names}
    batches = {t: list(adaptation_batches(data[t], num_examples, batch_size, seed)) for t in tv.task_names}
    calls: dict[str, list[tuple[tuple, dict]] | None] = dict.fromkeys(tv.task_names)  # each block's inputs
    was_training = encoder.training
    encoder.eval()
    try:
        for i, block in enumerate(blocks):
            prefix = f"{block}."
            local = {n[len(prefix):] for n in tv.names if n.startswith(prefix)}
            module = encoder.get_submodule(block)
            modules = linear_modules(module, local)
            for task in tv.task_names:  # the encoder up to this block, where the last block's could not say
                if calls[task] is None:
                    calls[task] = block_inputs(encoder, merged, block, batches[task], device)
            if modules:
                grams = []
                for k, task in enumerate(tv.task_names):
                    own = {n: base[prefix + n].detach() + taus[prefix + n][k].to(device=device, dtype=base[prefix + n].dtype)
                           for n in local}
                    grams.append(input_grams(module, own, modules, calls[task]))
                for name in modules:
                    if not all(name in g for g in grams):
                        continue  # a layer some expert never ran: the mean
                    key = f"{name}.weight" if name else "weight"
                    w0, tau = base[prefix + key].detach(), taus[prefix + key].to(device)
                    merged[prefix + key] = regmean_solve([g[name] for g in grams], [w0 + tau[k] for k in range(K)],
                                                         alpha).to(w0.dtype)
            if i + 1 < len(blocks):
                calls = next_block_inputs(encoder, module, {n: merged[prefix + n] for n in local}, calls,
                                          blocks[i + 1], merged, batches, device)
    finally:
        encoder.train(was_training)
    return merged


def _same(a: Any, b: Any) -> bool:
    """Whether two captured call values are identical (tensors bitwise; containers item by item)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # values that do not compare: not known to be the same
        return False


def next_block_inputs(encoder: nn.Module, module: nn.Module, params: Mapping[str, torch.Tensor],
                      calls: Mapping[str, list[tuple[tuple, dict]] | None], following: str,
                      merged: Mapping[str, torch.Tensor], batches: Mapping[str, list[torch.Tensor]],
                      device: torch.device) -> dict[str, list[tuple[tuple, dict]] | None]:
    """Each task's inputs of block ``following`` from the merged block ``module`` (``params``) run on
    its own inputs ``calls``: its output in place of the first argument, the other arguments kept.
    That holds when the encoder calls the blocks one after the other (a ViT's resblocks); it is
    checked on one batch against the encoder's own forward up to ``following``, and where it does
    not hold every task's entry is ``None`` (the caller runs the encoder up to the block instead).
    Saves re-running every merged block before each block for every batch: only the check (one
    batch) still runs the encoder up to the block. Every task's inputs of the current block are held
    at once (FusionBench holds them too), where running the encoder held one task's at a time."""
    first = next(iter(calls))
    out: dict[str, list[tuple[tuple, dict]] | None] = {}
    with torch.no_grad():
        for task, own in calls.items():
            advanced = []
            for args, kwargs in own or []:
                y = functional_call(module, dict(params), args, kwargs, strict=False)
                y = y[0] if isinstance(y, (tuple, list)) else y
                advanced.append(((y.detach(),) + tuple(args[1:]), kwargs))
            out[task] = advanced
    check = block_inputs(encoder, merged, following, batches[first][:1], device)
    if not (out[first] and check and _same(check[0], out[first][0])):
        return dict.fromkeys(calls)
    return out
