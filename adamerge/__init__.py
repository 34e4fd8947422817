"""adamerge: test-time adaptive model merging (AdaMerging) on PyTorch Lightning."""

from .adamerging import AdaMerging, entropy
from .checkpoints import CheckpointError, load_state_dict, save_state_dict
from .data import DatasetSource, FolderSource, InMemorySource, MultiTaskDataModule
from .merged_model import MergedModel
from .pool import CheckpointPool, LoadedPool, ModelPool
from .task_vectors import TaskVectors

__all__ = ["AdaMerging", "CheckpointError", "CheckpointPool", "DatasetSource", "FolderSource",
           "InMemorySource", "LoadedPool", "MergedModel", "ModelPool", "MultiTaskDataModule",
           "TaskVectors", "entropy", "load_state_dict", "save_state_dict"]
__version__ = "0.1.0"
