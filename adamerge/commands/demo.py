"""``adamerge demo``: the offline miniature benchmarks, built and cached on first use, through
:func:`adamerge.compare.compare`: the synthetic image suite of :mod:`adamerge.suites.synthetic`
(``--suite vision``, default) or the text suite of :mod:`adamerge.suites.text` (``--suite text``:
a tiny Llama-style causal LM with one LoRA expert per procedural text task)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..compare import CompareSettings, compare
from ..data.datamodule import MultiTaskDataModule
from ..methods import registry
from ..options import parse_overrides
from ..suites.synthetic import SuitePool, SuiteSource
from .compare import PAPER_BATCH_SIZE, hparam_overrides, paper_protocol, paper_schedules, parser


def demo_main(args: Sequence[str]) -> None:
    """``adamerge demo``: the offline miniature benchmark."""
    ns = parser("adamerge demo", demo=True).parse_args(list(args))
    if ns.suite == "text":
        return text_demo(ns)
    methods = registry.select(ns.methods)
    overrides = parse_overrides(ns.set)
    settings = CompareSettings(steps=ns.steps or 500, val_split=None if ns.val_split == "none" else ns.val_split,
                               hparams=hparam_overrides(ns))
    settings.check()
    pool = SuitePool("demo", cache_dir=ns.cache_dir, overrides=overrides, unseen_tasks=ns.unseen)
    loaded = pool.load()
    schedules = paper_schedules(loaded, methods, ns.steps) if ns.protocol == "paper" else {}
    settings.extra = {"suite_key": pool.spec.key(), **({"suite_overrides": overrides} if overrides else {}),
                      **({"protocol": "paper", "paper_schedules": schedules} if ns.protocol == "paper" else {})}
    settings.schedules = schedules  # --protocol paper: each learned row's own batch size and steps
    if ns.protocol == "paper":
        settings.hparams = paper_protocol(loaded, settings.hparams)
    dm = MultiTaskDataModule(SuiteSource("demo", overrides=overrides),
                             batch_size=PAPER_BATCH_SIZE if ns.protocol == "paper" else 16, eval_batch_size=500,
                             corruption=ns.corruption, severity=ns.severity)
    compare(loaded, dm, Path(ns.out), settings, methods, suite="demo")


def text_demo(ns) -> None:
    """``adamerge demo --suite text``: the registry's text rows on the LoRA text suite."""
    from ..suites.text import TextSuitePool, TextSuiteSource
    if ns.corruption or ns.set:
        raise ValueError("--corruption and --set apply to the vision suite only")
    methods = registry.select(ns.methods, default=registry.text_methods())
    settings = CompareSettings(steps=ns.steps or 500, val_split=None if ns.val_split == "none" else ns.val_split,
                               hparams=hparam_overrides(ns))
    settings.check()
    pool = TextSuitePool("demo", cache_dir=ns.cache_dir, unseen_tasks=ns.unseen)
    loaded = pool.load()
    schedules = paper_schedules(loaded, methods, ns.steps) if ns.protocol == "paper" else {}
    settings.extra = {"suite_key": pool.spec.key(),
                      **({"protocol": "paper", "paper_schedules": schedules} if ns.protocol == "paper" else {})}
    settings.schedules = schedules
    if ns.protocol == "paper":
        settings.hparams = paper_protocol(loaded, settings.hparams)
    dm = MultiTaskDataModule(TextSuiteSource("demo", cache_dir=ns.cache_dir),
                             batch_size=PAPER_BATCH_SIZE if ns.protocol == "paper" else 16, eval_batch_size=256)
    compare(loaded, dm, Path(ns.out), settings, methods, suite="text-demo")
