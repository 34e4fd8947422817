"""The engine every method shares: task vectors stacked per parameter, the fused functional merge
(``theta = base + coefficients @ task vectors``, one autograd node, once per step), the
test-time objectives (entropy, feature L1, confident pseudo-labels) and per-image feature caches
under frozen weights (experts' features computed once per adaptation image).

May import: :mod:`adamerge.io`, :mod:`adamerge.errors`. Never methods, models, data, suites or
commands: the engine knows tensors and modules, not where they came from or who trains them.
"""

from .expert_features import FeatureCache
from .lowrank import LowRankMergedModel, LowRankTaskVectors
from .merged_model import Granularity, MergedModel
from .objectives import confident_pseudo_label, entropy, feature_l1
from .task_vectors import DTYPES, TaskVectors, fingerprint_difference, select_names

__all__ = ["DTYPES", "FeatureCache", "Granularity", "LowRankMergedModel", "LowRankTaskVectors",
           "MergedModel", "TaskVectors", "confident_pseudo_label", "entropy", "feature_l1",
           "fingerprint_difference", "select_names"]
