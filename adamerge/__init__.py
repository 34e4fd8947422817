"""adamerge: test-time adaptive model merging (AdaMerging and more) on PyTorch Lightning.

The names a notebook needs are here; the packages hold the rest, in the order data flows
(docs/architecture.md): ``io`` (files) -> ``engine`` (task vectors, fused merge, objectives) ->
``data`` / ``models`` (adaptation data, model pools) -> ``methods`` (the registry, static merges,
Lightning modules) -> ``compare`` / ``report`` (tables) -> ``commands`` (the CLI). ``suites`` holds
the offline synthetic benchmark.

The names are imported on first use (PEP 562), so ``adamerge --help`` and a command's ``--help``
do not pay for importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "CompareSettings": "compare", "compare": "compare",
    "DatasetSource": "data", "FolderSource": "data", "HFSource": "data", "InMemorySource": "data",
    "MultiTaskDataModule": "data",
    "MergedModel": "engine", "TaskVectors": "engine", "entropy": "engine",
    "ExportedModel": "exported",
    "CheckpointError": "io", "load_state_dict": "io", "save_state_dict": "io",
    "WEMoE": "methods", "AdaMerging": "methods", "AdaRank": "methods", "ConcreteAdaMerging": "methods", "Method": "methods", "Smile": "methods",
    "Surgery": "methods", "Tinting": "methods", "TwinMerging": "methods", "registry": "methods",
    "ShardedMergeStrategy": "methods",
    "CheckpointPool": "models", "LoadedPool": "models", "ModelPool": "models", "OpenCLIPPool": "models",
    "PreloadedPool": "models",
    "evaluate": "report", "quiet": "report",
    "SuitePool": "suites", "SuiteSource": "suites",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'adamerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

