"""Contract suite for runtimes: results in task order, identical to the serial runtime."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from fedtransfer import (
    FederatedDataset,
    Recipe,
    Runtime,
    SerialRuntime,
    ServerState,
    run_round,
    tree,
)

pytestmark = pytest.mark.usefixtures("single_thread")

RUNTIMES: list[Runtime] = [SerialRuntime()]


@pytest.fixture(params=RUNTIMES, ids=repr)
def runtime(request: pytest.FixtureRequest) -> Runtime:
    return request.param


def _two_rounds(
    recipe: Recipe,
    state: ServerState,
    data: FederatedDataset,
    runtime: Runtime,
    model_fn: Callable[[], nn.Module],
) -> ServerState:
    for _ in range(2):
        state, _report = run_round(recipe, state, data, runtime, model_fn=model_fn)
    return state


def test_runtime_is_a_runtime(runtime: Runtime) -> None:
    assert isinstance(runtime, Runtime)


def test_runtime_map_preserves_task_order(runtime: Runtime) -> None:
    tasks = [5, 3, 9, 1, 7, 2]
    assert runtime.map(lambda t: (t, t * t), tasks) == [(t, t * t) for t in tasks]


def test_runtime_map_of_no_tasks_is_empty(runtime: Runtime) -> None:
    assert runtime.map(lambda t: t, []) == []


def test_runtime_two_rounds_match_serial_runtime_bit_for_bit(
    runtime: Runtime,
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    reference = _two_rounds(tiny_recipe, tiny_state, tiny_data, SerialRuntime(), tiny_model_fn)
    result = _two_rounds(tiny_recipe, tiny_state, tiny_data, runtime, tiny_model_fn)
    assert not tree.equal(reference.params, tiny_state.params)
    assert tree.equal(result.params, reference.params)


def test_runtime_two_rounds_are_reproducible(
    runtime: Runtime,
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    first = _two_rounds(tiny_recipe, tiny_state, tiny_data, runtime, tiny_model_fn)
    second = _two_rounds(tiny_recipe, tiny_state, tiny_data, runtime, tiny_model_fn)
    assert tree.equal(first.params, second.params)
    assert tree.equal(first.server, second.server)
    assert first.clients.keys() == second.clients.keys()
    assert all(tree.equal(first.clients[c], second.clients[c]) for c in first.clients)
