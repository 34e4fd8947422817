"""The checkpoint guard of learned methods: what a checkpoint keeps, and the one check every path
that reads learned tensors goes through (resume, validate, test, export, predict, ``init_from``).

A learned module's checkpoint holds exactly its learned tensors (``learned_state()``: the
coefficients, the per-task modules, a method's extra tensors such as WEMoE's routers) plus
``checkpoint["adamerge"]``: the method, the pool fingerprint, the granularity and the registry
row. :class:`CheckpointGuard` is the part of :class:`~adamerge.methods.AdaMerging` that writes and
reads that; :func:`check_checkpoint` refuses another method's or another pool's file in one line.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..engine.task_vectors import fingerprint_difference
from ..io.checkpoints import read_checkpoint

COEFFICIENTS_KEY = "merged.coefficients"


class CheckpointGuard:
    """Writes and reads a learned module's checkpoints.

    Args:
        method: the method identity written into checkpoints (``AdaMerging.method``).
        fingerprint: the pool fingerprint of the task vectors in use.
        learned_state: ``() -> {name: tensor}``, the module's learned tensors (the live ones).
    """

    def __init__(self, method: str, fingerprint: dict, learned_state: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.method, self.fingerprint, self.learned_state = method, fingerprint, learned_state

    def check(self, checkpoint: dict[str, Any], source: str, coefficients_only: bool = False) -> None:
        """:func:`check_checkpoint` against this module (its method, unless only coefficients are read)."""
        expected = {k: tuple(v.shape) for k, v in self.learned_state().items()}
        if coefficients_only:
            expected = {COEFFICIENTS_KEY: expected[COEFFICIENTS_KEY]}
        check_checkpoint(checkpoint, self.fingerprint, expected, source=source,
                         method=None if coefficients_only else self.method)

    @torch.no_grad()
    def load(self, path: str, coefficients_only: bool = False) -> dict[str, Any]:
        """Read ``path`` (no code unpickled), check it and copy its learned tensors (or only the
        coefficients) into the module's; returns the checkpoint."""
        checkpoint = read_checkpoint(path)
        self.check(checkpoint, str(path), coefficients_only)
        state = checkpoint["state_dict"]
        for k, v in self.learned_state().items():
            if not coefficients_only or k == COEFFICIENTS_KEY:
                v.copy_(state[k])
        return checkpoint

    def for_saving(self, checkpoint: dict[str, Any], step: int, meta: Mapping[str, Any]) -> None:
        """Keep only the learned tensors of Lightning's checkpoint (refusing non-finite ones: the
        last good checkpoint stays), and record ``meta`` besides what callbacks recorded first
        (the registry row: :class:`adamerge.methods.registry.RecordRow`)."""
        state = checkpoint["state_dict"]
        kept = {k: state[k] for k in self.learned_state()}
        for k, v in kept.items():
            if not torch.isfinite(v).all():
                what = "coefficients" if k == COEFFICIENTS_KEY else k
                raise FloatingPointError(f"refusing to save non-finite {what} at step {step}; "
                                         "the last good checkpoint is kept")
        checkpoint["state_dict"] = kept
        checkpoint["adamerge"] = {**(checkpoint.get("adamerge") or {}), "method": self.method,
                                  "fingerprint": self.fingerprint, **meta}


def check_checkpoint(checkpoint: dict[str, Any], fingerprint: dict,
                     expected: Mapping[str, tuple[int, ...]] | tuple[int, ...],
                     source: str = "checkpoint", method: str | None = "adamerging") -> None:
    """Refuse a checkpoint made by another method or on another model pool, naming the difference.

    The one check every path that consumes learned tensors goes through (resume, validate, test,
    export, ``init_from``): the method that wrote it, task order, merged parameter names and
    shapes, a hash of the task vectors (other files), the task-vector transform (e.g. TIES
    trimming) and the shape of every learned tensor (granularity, adapter rank). Raises
    ``ValueError`` with a one-line message.

    Args:
        checkpoint: the loaded checkpoint dict (see :func:`adamerge.io.checkpoints.read_checkpoint`).
        fingerprint: ``TaskVectors.fingerprint()`` of the pool in use.
        expected: learned tensor name -> shape this run expects (a bare shape: the coefficients').
        source: how to name the checkpoint in messages (its path).
        method: the method this run is; ``None`` accepts any (only coefficients are read).
            Checkpoints written before methods were recorded count as ``adamerging``.
    """
    if not isinstance(expected, Mapping):
        expected = {COEFFICIENTS_KEY: tuple(expected)}
    meta = checkpoint.get("adamerge")
    state = checkpoint.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict) or COEFFICIENTS_KEY not in state \
            or "fingerprint" not in meta:
        from ..io.checkpoints import not_a_run_checkpoint
        what = not_a_run_checkpoint(checkpoint) or "not an adamerge checkpoint (no coefficients / fingerprint)"
        raise ValueError(f"{source}: {what}")
    theirs = meta.get("method", "adamerging")
    if method is not None and theirs != method:
        hint = " (to start from its coefficients, pass it as init_from)" if COEFFICIENTS_KEY in state else ""
        raise ValueError(f"{source} was written by method {theirs!r}, this run is {method!r}: "
                         f"its learned tensors do not apply{hint}")
    diff = fingerprint_difference(meta["fingerprint"], fingerprint)
    if diff:
        raise ValueError(f"{source} was made on a different model pool: {diff}")
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{source} has no {key!r} (it holds {sorted(state)[:4]}...); this run "
                             f"expects {len(expected)} learned tensors")
        found = tuple(state[key].shape)
        if found != tuple(shape):
            split = " with split q/k/v rows" if meta.get("split_qkv") else ""
            what = f"{meta.get('granularity')} coefficients{split}" if key == COEFFICIENTS_KEY else repr(key)
            fix = ("use the same granularity and model.split_qkv" if key == COEFFICIENTS_KEY
                   else "use the same method settings")
            raise ValueError(f"{source} holds {what} of shape {found}, this run expects "
                             f"{tuple(shape)}: {fix}")
    extra = [k for k in state if k not in expected]
    if extra and method is not None:
        raise ValueError(f"{source} holds learned tensors this run does not have: {extra[:4]}")
