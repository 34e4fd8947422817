"""Small helpers for error messages that tell the user what to do next."""

from __future__ import annotations

import difflib
from typing import Iterable


def suggest(name: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The entry of ``known`` closest to ``name`` (difflib ratio >= ``cutoff``), or None.

    Matching is case-insensitive first (``MNIST`` -> ``mnist``), then by similarity.

    Args:
        name: what the user wrote.
        known: the valid names.
        cutoff: minimum similarity in [0, 1] for a suggestion.
    """
    known = [str(k) for k in known]
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[close[0]] if close else None


def unknown_name(kind: str, name: str, known: Iterable[str], where: str = "") -> str:
    """A one-line message for an unknown name, with the nearest known one and the full list.

    ``unknown_name("task", "digts", ["digits", "shapes"])`` gives
    ``unknown task 'digts'; did you mean 'digits'? (known: digits, shapes)``.
    """
    known = list(known)
    near = suggest(name, known)
    hint = f"; did you mean {near!r}?" if near is not None else ""
    listing = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
    return f"unknown {kind} {name!r}{where}{hint} (known: {listing or 'none'})"


class RunInProgressError(RuntimeError):
    """A run folder is in use by another live ``adamerge fit`` (see
    :class:`adamerge.io.run_checkpoint.RunLock`); two runs must not write one folder's checkpoints."""
