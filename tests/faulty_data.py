"""A data source with one poisoned adaptation image, for tests that need a NaN loss mid-run.

Imported by class path from configs written by tests (``faulty_data.PoisonedSuiteSource``).
"""

from __future__ import annotations

from torch.utils.data import Dataset, TensorDataset

from adamerge.suites.synthetic import SuiteSource


class PoisonedSuiteSource(SuiteSource):
    """A built-in suite whose ``split`` image ``index`` of ``task`` is all NaN.

    Args:
        suite: preset name.
        task: the task whose image is poisoned.
        index: dataset index of the poisoned image.
        split: the split holding it.
    """

    def __init__(self, suite: str = "tiny", task: str = "digits", index: int = 0,
                 split: str = "test") -> None:
        super().__init__(suite)
        self.task, self.index, self.split = task, index, split

    def dataset(self, task: str, split: str) -> Dataset:
        ds = super().dataset(task, split)
        if (task, split) != (self.task, self.split):
            return ds
        x, y = ds.tensors
        x = x.clone()
        x[self.index] = float("nan")
        return TensorDataset(x, y)
