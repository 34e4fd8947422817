"""The engine every method shares: task vectors stacked per parameter, the fused functional merge
(``theta = base + coefficients @ task vectors``, one autograd node, once per step) and the
test-time objectives (entropy today).

May import: :mod:`adamerge.io`, :mod:`adamerge.errors`. Never methods, models, data, suites or
commands: the engine knows tensors and modules, not where they came from or who trains them.
"""

from .merged_model import Granularity, MergedModel
from .objectives import entropy
from .task_vectors import DTYPES, TaskVectors, fingerprint_difference, select_names

__all__ = ["DTYPES", "Granularity", "MergedModel", "TaskVectors", "entropy", "fingerprint_difference",
           "select_names"]
