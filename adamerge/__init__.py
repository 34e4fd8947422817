"""adamerge: test-time adaptive model merging (AdaMerging and more) on PyTorch Lightning.

The names a notebook needs are here; the packages hold the rest, in the order data flows
(docs/architecture.md): ``io`` (files) -> ``engine`` (task vectors, fused merge, objectives) ->
``data`` / ``models`` (adaptation data, model pools) -> ``methods`` (the registry, static merges,
Lightning modules) -> ``compare`` / ``report`` (tables) -> ``commands`` (the CLI). ``suites`` holds
the offline synthetic benchmark.
"""

from .compare import CompareSettings, compare
from .data import DatasetSource, FolderSource, HFSource, InMemorySource, MultiTaskDataModule
from .engine import MergedModel, TaskVectors, entropy
from .exported import ExportedModel
from .io import CheckpointError, load_state_dict, save_state_dict
from .methods import WEMoE, AdaMerging, AdaRank, Method, Surgery, Tinting, TwinMerging, registry
from .models import CheckpointPool, LoadedPool, ModelPool, OpenCLIPPool, PreloadedPool
from .report import evaluate
from .suites import SuitePool, SuiteSource

__all__ = ["AdaMerging", "AdaRank", "CheckpointError", "CheckpointPool", "CompareSettings", "DatasetSource",
           "ExportedModel", "FolderSource", "HFSource", "InMemorySource", "LoadedPool", "MergedModel", "Method",
           "ModelPool", "MultiTaskDataModule", "OpenCLIPPool", "PreloadedPool", "SuitePool",
           "SuiteSource", "Surgery", "TaskVectors", "Tinting", "TwinMerging", "WEMoE", "compare", "entropy", "evaluate", "load_state_dict",
           "registry", "save_state_dict"]
__version__ = "0.1.0"
