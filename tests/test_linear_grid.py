"""Grid searches over a hyper-parameter a static row is linear in (``Method.linear``): one merge
per point of the other hyper-parameters, rescaled, instead of one merge per grid point."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch

from adamerge.compare import grid_models, one_model
from adamerge.methods import registry
from conftest import RandomPool

LINEAR = [n for n in registry.names() if registry.get(n).linear]


def test_the_linear_rows_are_declared():
    assert len(LINEAR) >= 8 and all(registry.get(n).kind == "static" for n in LINEAR)
    with pytest.raises(ValueError, match="linear names a hyper-parameter of a static row"):
        dataclasses.replace(registry.get(LINEAR[0]), linear="nope")


@pytest.mark.parametrize("name", LINEAR)
def test_the_merge_is_base_plus_value_times_a_delta_free_of_both(name):
    """What the declaration promises: merge(base, v) = base + v * merge(0, 1), for any v and base."""
    method = registry.get(name)
    loaded = RandomPool().load()
    tv = loaded.task_vectors
    base = {n: p.detach() for n, p in loaded.encoder.named_parameters()}
    zero = {n: torch.zeros_like(p) for n, p in base.items()}
    hp = method.defaults()
    delta = method.build(tv, zero, **{**hp, method.linear: 1.0})
    for value in (0.35, 1.3):
        got = method.build(tv, base, **{**hp, method.linear: value})
        assert got.keys() == delta.keys()
        for n in got:
            torch.testing.assert_close(got[n], base[n] + value * delta[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LINEAR[:3])
def test_a_grid_merges_once_per_point_of_the_other_hyper_parameters(name):
    method = registry.get(name)
    calls = []

    @functools.wraps(method.build)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return method.build(*args, **kwargs)

    row = dataclasses.replace(method, build=counted)
    loaded = RandomPool().load()
    bench = SimpleNamespace(loaded=loaded, datamodule=None, task_vectors=loaded.task_vectors,
                            base={n: p.detach() for n, p in loaded.encoder.named_parameters()})
    grids = {row.linear: (0.1, 0.5, 0.9)}
    points = list(grid_models(row, bench, row.defaults(), grids))
    assert len(calls) == 1 and [p for p, _ in points] == [{row.linear: v} for v in grids[row.linear]]
    for point, params in points:  # each point's model is the row's own merge there
        want = one_model(method, loaded, None, {**row.defaults(), **point}, bench.task_vectors, bench.base)
        for n in want:
            torch.testing.assert_close(params[n], want[n], rtol=1e-5, atol=1e-6)
    calls.clear()  # a grid that is not over the linear hyper-parameter merges at every point
    unlinear = dataclasses.replace(row, linear=None)
    assert len(list(grid_models(unlinear, bench, row.defaults(), grids))) == 3 and len(calls) == 3


def test_a_value_the_row_refuses_is_still_refused():
    row = next(registry.get(n) for n in LINEAR if "scaling must be >= 0" in _refusal(registry.get(n)))
    loaded = RandomPool().load()
    bench = SimpleNamespace(loaded=loaded, datamodule=None, task_vectors=loaded.task_vectors,
                            base={n: p.detach() for n, p in loaded.encoder.named_parameters()})
    with pytest.raises(ValueError, match="scaling must be >= 0"):
        list(grid_models(row, bench, row.defaults(), {row.linear: (0.5, -0.1)}))


def _refusal(method) -> str:
    """The builder's error at a negative scaling ('' when it takes one)."""
    loaded = RandomPool().load()
    base = {n: p.detach() for n, p in loaded.encoder.named_parameters()}
    try:
        method.build(loaded.task_vectors, base, **{**method.defaults(), method.linear: -0.1})
    except ValueError as e:
        return str(e)
    return ""

