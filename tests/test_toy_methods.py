"""A registered toy method of each new kind goes through the contract matrix's checks (the rows
are registered for the test only; tests/toy_methods.py is all the code they need)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from adamerge.methods import registry
from adamerge.methods.registry import Method
from test_contract import check_learned_row, check_one_model_row
from toy_methods import ToyConfidence, data_weighted

TOYS = (Method("data_weighted", "fitted", "toy: task arithmetic weighted by each task's adaptation data",
               data_weighted, demo=False, source="tests/toy_methods.py"),
        Method("toy_confidence", "learned", "toy: coefficients raising each head's top probability",
               ToyConfidence, demo=False, source="tests/toy_methods.py"))


@pytest.fixture
def with_toys(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", MappingProxyType({**registry.REGISTRY, **{m.name: m for m in TOYS}}))


def test_a_fitted_toy_goes_through_compare_export_and_predict(with_toys, tmp_path, capsys):
    assert registry.get("data_weighted").profile()["data"] == "unlabeled adaptation images (statistics)"
    check_one_model_row("data_weighted", tmp_path, capsys)


def test_a_learned_toy_goes_through_every_path(with_toys, tmp_path, capsys):
    check_learned_row("toy_confidence", tmp_path, capsys, {})
