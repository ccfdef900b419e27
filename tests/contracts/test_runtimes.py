"""Contract suite for runtimes: results in task order, identical to the serial runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch import nn

from fedtransfer import Recipe, Runtime, ServerState, run_round, tree
from fedtransfer.data import FederatedDataset
from fedtransfer.runtime import ProcessRuntime, RayRuntime, SerialRuntime

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]

# one thread per worker, as the serial reference runs here (single_thread)
RUNTIMES: list[Runtime] = [
    SerialRuntime(),
    ProcessRuntime(workers=2, threads=1),
    RayRuntime(num_actors=2, threads=1),  # a local Ray instance with 2 CPUs
]


def square_pair(t: int) -> tuple[int, int]:
    return t, t * t


def identity(t: int) -> int:
    return t


@pytest.fixture(scope="module")
def workers_import_tests() -> Iterator[None]:
    """Worker processes and Ray actors import the mapped functions (this module) and the model
    factory (``tests.conftest``) by name: they start from the repository root with it on
    ``sys.path``. The workers stop at the end of the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.syspath_prepend(str(ROOT))
        yield
        for rt in RUNTIMES:
            if isinstance(rt, ProcessRuntime):
                rt.close()
            elif isinstance(rt, RayRuntime):
                rt.shutdown()


@pytest.fixture(params=RUNTIMES, ids=repr)
def runtime(request: pytest.FixtureRequest, workers_import_tests: None) -> Runtime:
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
    """``map`` takes any sequence of tasks (here a tuple) and returns a list, in task order."""
    assert isinstance(runtime, Runtime)
    out = runtime.map(square_pair, (4, 2, 3))
    assert isinstance(out, list) and out == [(4, 16), (2, 4), (3, 9)]


def test_runtime_map_preserves_task_order(runtime: Runtime) -> None:
    tasks = [5, 3, 9, 1, 7, 2]
    assert runtime.map(square_pair, tasks) == [(t, t * t) for t in tasks]


def test_runtime_map_of_no_tasks_is_empty(runtime: Runtime) -> None:
    assert runtime.map(identity, []) == []


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
    assert first.holdings.local.keys() == second.holdings.local.keys()
    assert all(
        tree.equal(first.holdings.local[c], second.holdings.local[c]) for c in first.holdings.local
    )
