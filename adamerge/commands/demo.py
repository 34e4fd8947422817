"""``adamerge demo``: the offline miniature benchmark (the synthetic suite of
:mod:`adamerge.suites`, built and cached on first use) through :func:`adamerge.compare.compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..compare import CompareSettings, compare
from ..data.datamodule import MultiTaskDataModule
from ..methods import registry
from ..options import parse_overrides
from ..suites.synthetic import SuitePool, SuiteSource
from .compare import hparam_overrides, parser


def demo_main(args: Sequence[str]) -> None:
    """``adamerge demo``: the offline miniature benchmark."""
    ns = parser("adamerge demo", demo=True).parse_args(list(args))
    methods = registry.select(ns.methods)
    overrides = parse_overrides(ns.set)
    settings = CompareSettings(steps=ns.steps or 500, val_split=None if ns.val_split == "none" else ns.val_split,
                               hparams=hparam_overrides(ns))
    settings.check()
    pool = SuitePool("demo", cache_dir=ns.cache_dir, overrides=overrides, unseen_tasks=ns.unseen)
    settings.extra = {"suite_key": pool.spec.key(), **({"suite_overrides": overrides} if overrides else {})}
    loaded = pool.load()
    dm = MultiTaskDataModule(SuiteSource("demo", overrides=overrides), batch_size=16, eval_batch_size=500,
                             corruption=ns.corruption, severity=ns.severity)
    compare(loaded, dm, Path(ns.out), settings, methods, suite="demo")
