"""Task-vector transforms (K task vectors in, K out) that AdaMerging can learn its coefficients
on: ``preprocess: NAME`` with ``preprocess_options``. AdaMerging++ is ``preprocess: ties`` (also
spelled ``trim: 0.2``). Each transform is the ``<name>_task_vectors`` function of its method's
module and records itself in ``meta["transform"]``, so it is part of the pool fingerprint that
every checkpoint carries.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..engine.task_vectors import TaskVectors
from ..errors import unknown_name
from .sparsify import breadcrumbs_task_vectors, consensus_task_vectors, dare_task_vectors
from .static import ties_task_vectors
from .svd_merges import tsv_m_task_vectors

SUFFIX = "_task_vectors"
TRANSFORMS: tuple[Callable[..., TaskVectors], ...] = (
    ties_task_vectors, dare_task_vectors, breadcrumbs_task_vectors, consensus_task_vectors, tsv_m_task_vectors)


def transform_names() -> list[str]:
    """The names ``preprocess`` accepts (the transforms' function names without ``_task_vectors``)."""
    return [f.__name__.removesuffix(SUFFIX) for f in TRANSFORMS]


def preprocess(task_vectors: TaskVectors, name: str, options: Mapping[str, Any] | None = None) -> TaskVectors:
    """``task_vectors`` through the transform called ``name`` with ``options`` (its keyword
    arguments; an unknown key is an error naming the transform's arguments)."""
    import inspect
    by_name = dict(zip(transform_names(), TRANSFORMS))
    if name not in by_name:
        raise ValueError(unknown_name("preprocess", name, list(by_name)))
    fn = by_name[name]
    known = [p for p in inspect.signature(fn).parameters if p != "task_vectors"]
    bad = [k for k in (options or {}) if k not in known]
    if bad:
        raise ValueError(f"preprocess {name!r}: unknown options {bad} (known: {known})")
    out = fn(task_vectors, **dict(options or {}))
    if not out.meta.get("transform"):
        raise RuntimeError(f"transform {name!r} did not record itself in meta['transform']")
    return out
