"""Offline synthetic benchmark suites (``tiny``, ``demo``): a small ViT "pretrained" CLIP-style
on procedurally generated tasks, one expert per task, built deterministically and cached; their
model pool and dataset source plug into the same engine as real models.

May import: :mod:`adamerge.engine`, :mod:`adamerge.models`, :mod:`adamerge.data`,
:mod:`adamerge.io`, :mod:`adamerge.errors`, :mod:`adamerge.options`. Never methods or commands:
a suite is data and weights, not a way of merging.
"""

from .synthetic import SUITES, SuitePool, SuiteSource, SuiteSpec, TinyViT, get_spec

from .text import TEXT_PRESETS, TextSuitePool, TextSuiteSource, TextSuiteSpec

__all__ = ["SUITES", "SuitePool", "SuiteSource", "SuiteSpec", "TEXT_PRESETS", "TextSuitePool", "TextSuiteSource",
           "TextSuiteSpec", "TinyViT", "get_spec"]
