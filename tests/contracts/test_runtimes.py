"""Contract suite for runtimes: results in task order, identical to the serial runtime — bit
for bit, or within the tolerance a runtime declares where it trains a cohort its own way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import make_tiny_model
from torch import nn

import fedtransfer.client.fast.vectorized as vectorized_module
from fedtransfer import Recipe, Runtime, ServerState, run_round, tree
from fedtransfer.client.fast import TOLERANCE
from fedtransfer.data import FederatedDataset
from fedtransfer.runtime import (
    AutoRuntime,
    ProcessRuntime,
    RayRuntime,
    SerialRuntime,
    VectorizedRuntime,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]

# one thread per worker, as the serial reference runs here (single_thread)
RUNTIMES: list[Runtime] = [
    SerialRuntime(),
    ProcessRuntime(workers=2, threads=1),
    RayRuntime(num_actors=2, threads=1),  # a local Ray instance with 2 CPUs
    VectorizedRuntime(),
    AutoRuntime(),
]

FAST = (VectorizedRuntime, AutoRuntime)
"""The runtimes that train a cohort at once (the client fast path), where it supports it."""

TOLERANCES: dict[type, float] = {VectorizedRuntime: TOLERANCE, AutoRuntime: TOLERANCE}
"""Each runtime's declared tolerance against the serial runtime, where it trains a cohort:
the fast runtimes train it stacked, and batched float arithmetic reorders sums
(``fedtransfer.client.fast.TOLERANCE``). Every other runtime is bit for bit (0), and so is a
fast one on a cohort it declines (it then runs client by client, exactly as serial does)."""


class MLP(nn.Module):
    """8x8 inputs ▸ a hidden layer ▸ a 3-class head, without BatchNorm or dropout: a model the
    fast runtimes train stacked (the tiny model's BatchNorm in train mode they decline)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_mlp() -> nn.Module:
    """Module level: worker processes and Ray actors import it by name."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP()


MODELS: dict[str, Callable[[], nn.Module]] = {"batchnorm": make_tiny_model, "mlp": make_mlp}


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


@pytest.fixture(params=list(MODELS))
def model_fn(request: pytest.FixtureRequest) -> Callable[[], nn.Module]:
    return MODELS[request.param]


@pytest.fixture
def cohorts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each cohort the vectorised path was handed trained at once (True) or was
    declined (False), in this process."""
    seen: list[bool] = []
    real = vectorized_module.vectorized_update

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(vectorized_module, "vectorized_update", spy)
    return seen


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


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def test_runtime_two_rounds_match_serial_runtime_within_its_tolerance(
    runtime: Runtime,
    tiny_recipe: Recipe,
    tiny_data: FederatedDataset,
    model_fn: Callable[[], nn.Module],
    cohorts: list[bool],
) -> None:
    """Bit for bit, except where a fast runtime trains the cohort stacked (the MLP): within
    its declared tolerance there. On the BatchNorm model the fast runtimes decline every
    cohort, so they are bit for bit too."""
    state = ServerState.initial(tiny_recipe, model_fn(), seed=0)
    reference = _two_rounds(tiny_recipe, state, tiny_data, SerialRuntime(), model_fn)
    result = _two_rounds(tiny_recipe, state, tiny_data, runtime, model_fn)
    assert not tree.equal(reference.params, state.params)
    stacked = isinstance(runtime, FAST) and model_fn is make_mlp
    assert cohorts == ([stacked] * 2 if isinstance(runtime, FAST) else [])
    if stacked:
        assert _max_diff(result.params, reference.params) <= TOLERANCES[type(runtime)]
        assert result.server.keys() == reference.server.keys()
    else:
        assert tree.equal(result.params, reference.params)
        assert tree.equal(result.server, reference.server)


def test_runtime_two_rounds_are_reproducible(
    runtime: Runtime,
    tiny_recipe: Recipe,
    tiny_data: FederatedDataset,
    model_fn: Callable[[], nn.Module],
) -> None:
    """Bit for bit, every runtime (the fast ones' stacked arithmetic too)."""
    tiny_state = ServerState.initial(tiny_recipe, model_fn(), seed=0)
    first = _two_rounds(tiny_recipe, tiny_state, tiny_data, runtime, model_fn)
    second = _two_rounds(tiny_recipe, tiny_state, tiny_data, runtime, model_fn)
    assert tree.equal(first.params, second.params)
    assert tree.equal(first.server, second.server)
    assert first.holdings.local.keys() == second.holdings.local.keys()
    assert all(
        tree.equal(first.holdings.local[c], second.holdings.local[c]) for c in first.holdings.local
    )
