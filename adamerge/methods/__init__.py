"""Merging methods and their registry (:mod:`adamerge.methods.registry`, the one list of method
names): reference rows, static merges over task vectors (weight averaging, task arithmetic, TIES
and the TIES transform), and learned methods as Lightning modules: AdaMerging (task-/layer-wise,
AdaMerging++) is the engine module; Representation Surgery (per-task feature adapters) and Model
Tinting (per-task trainable heads) are small subclasses of it with their own objectives.

May import: :mod:`adamerge.engine`, :mod:`adamerge.models`, :mod:`adamerge.data`,
:mod:`adamerge.io`, :mod:`adamerge.report`, :mod:`adamerge.errors`. Never suites or commands.
"""

from . import registry
from .adamerging import AdaMerging
from .adarank import AdaRank
from .concrete import ConcreteAdaMerging
from .registry import REGISTRY, Method
from .sharding import ShardedMergeStrategy
from .smile import Smile, load_smile
from .static import task_arithmetic, ties, ties_task_vectors, weight_averaging
from .surgery import Surgery, SurgeryAdapter
from .tinting import TintedHead, Tinting
from .twin import TwinMerging, load_twin
from .wemoe import WEMoE, load_wemoe

__all__ = ["REGISTRY", "AdaMerging", "AdaRank", "ConcreteAdaMerging", "Method", "ShardedMergeStrategy", "Smile", "Surgery", "SurgeryAdapter",
           "TintedHead", "Tinting", "TwinMerging", "WEMoE", "load_smile", "load_twin", "load_wemoe",
           "registry", "task_arithmetic", "ties", "ties_task_vectors", "weight_averaging"]
