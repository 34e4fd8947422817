"""Data: the adaptation stream (one unlabeled batch per task per step, a deterministic function
of seed and step) and the Lightning data module; dataset sources (in memory, image folders,
Hugging Face datasets with a decoded-image cache, text prompts from JSONL/CSV files or Hugging Face datasets); the task registry (``tasks.yaml``); open_clip's
preprocessing.

May import: :mod:`adamerge.io`, :mod:`adamerge.errors`.
"""

from .datamodule import (AdaptationStream, DatasetSource, FolderSource, ImageFolderDataset, InMemorySource,
                         MultiTaskDataModule, UndecodableImageWarning, label_count)
from .hf import HFSource
from .text import HFTextSource, PromptDataset, TextSource

__all__ = ["AdaptationStream", "DatasetSource", "FolderSource", "HFSource", "HFTextSource", "ImageFolderDataset",
           "InMemorySource", "MultiTaskDataModule", "PromptDataset", "TextSource", "UndecodableImageWarning",
           "label_count"]
