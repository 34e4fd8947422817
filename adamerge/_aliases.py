"""The module paths of adamerge 0.1 (a flat package), kept for one release.

Users' YAML configs name classes by module path (``class_path: adamerge.suite.SuitePool``), and
scripts import from the old modules. An import of an old path gives the module that now holds its
code, with a :class:`MovedModuleWarning` naming the new path; no file per old module is needed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3"

# old module -> the module that holds its code now
MOVED: dict[str, str] = {
    "adamerge.adamerging": "adamerge.methods.adamerging",
    "adamerge.benchmark": "adamerge.commands.bench",
    "adamerge.callbacks": "adamerge.io.run_checkpoint",
    "adamerge.checkpoints": "adamerge.io.checkpoints",
    "adamerge.cli": "adamerge.commands.main",
    "adamerge.clip": "adamerge.models.clip",
    "adamerge.clip_data": "adamerge.data.hf",
    "adamerge.convert": "adamerge.models.convert",
    "adamerge.export": "adamerge.io.export",
    "adamerge.finetune": "adamerge.commands.finetune",
    "adamerge.merge_methods": "adamerge.methods.static",
    "adamerge.merged_model": "adamerge.engine.merged_model",
    "adamerge.pool": "adamerge.models.pool",
    "adamerge.suite": "adamerge.suites.synthetic",
    "adamerge.task_vectors": "adamerge.engine.task_vectors",
    "adamerge.tasks": "adamerge.data.tasks",
}


class MovedModuleWarning(FutureWarning):
    """An adamerge module was imported by its old path (shown to users by default)."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to its new module (the same object, not a copy)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} is deprecated and will be removed in adamerge {REMOVED_IN}: "
                      f"use {new} (in YAML configs: class_path: {new}.<Class>)",
                      MovedModuleWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:  # the new module is already executed
        pass


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (importing ``adamerge`` does this)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
