"""Small shared fixtures: a tiny BatchNorm model, a tiny federated dataset, a fast recipe."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedtransfer import (
    AllClients,
    ClientTask,
    FederatedDataset,
    Full,
    LocalTraining,
    Recipe,
    Reply,
    SerialRuntime,
    ServerState,
    TensorData,
)

# the shared data folder beside the repository (as CI has it), unless the caller names one
os.environ.setdefault(
    "FEDTRANSFER_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
)

NUM_CLIENTS = 5
NUM_CLASSES = 3
TRAIN_PER_CLIENT = 24
TEST_PER_CLIENT = 8


class TinyNet(nn.Module):
    """8x8 single-channel inputs ▸ Linear ▸ BatchNorm ▸ ReLU ▸ Linear head (3 classes)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_tiny_model(seed: int = 0) -> nn.Module:
    """A :class:`TinyNet` whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyNet()


def make_tiny_data(seed: int = 0) -> FederatedDataset:
    """Five clients of random 8x8 images whose label depends on the mean of one quadrant."""
    gen = torch.Generator().manual_seed(seed)
    train: dict[str, TensorData] = {}
    test: dict[str, TensorData] = {}
    for i in range(NUM_CLIENTS):
        n = TRAIN_PER_CLIENT + TEST_PER_CLIENT
        x = torch.randn(n, 1, 8, 8, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float()
        train[f"c{i}"] = TensorData(x[:TRAIN_PER_CLIENT], y[:TRAIN_PER_CLIENT])
        test[f"c{i}"] = TensorData(x[TRAIN_PER_CLIENT:], y[TRAIN_PER_CLIENT:])
    return FederatedDataset(train, test, NUM_CLASSES)


def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the test, then restore the previous setting.

    The models here are tiny: intra-op threads only add synchronisation, which on a busy 2-core
    machine turns microsecond kernels into tens of milliseconds. Scoped per test (not set
    globally) because numerics depend on the thread count, and other suites compare in-process
    results with subprocess runs that use the default.
    """
    yield from _one_thread()


@pytest.fixture(scope="module")
def single_thread_module() -> Iterator[None]:
    """``single_thread`` for a whole module (module-scoped fixtures that run experiments)."""
    yield from _one_thread()


@pytest.fixture
def tiny_model_fn() -> Callable[[], nn.Module]:
    """A deterministic model factory, usable as ``run_round(..., model_fn=...)``."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_data() -> FederatedDataset:
    return make_tiny_data()


@pytest.fixture
def tiny_recipe() -> Recipe:
    """Full fine-tuning, two local SGD steps of 8 examples, every client every round."""
    return Recipe(
        policy=Full(),
        local=LocalTraining(lr=0.1, steps=2, batch_size=8),
        sampler=AllClients(),
    )


@pytest.fixture
def tiny_state(tiny_recipe: Recipe) -> ServerState:
    return ServerState.initial(tiny_recipe, make_tiny_model(), seed=0)


@dataclass(frozen=True)
class RecordingRuntime:
    """The serial runtime, keeping every task and every client result (in task order)."""

    tasks: list[ClientTask] = field(default_factory=list)
    results: list[Reply] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        out = SerialRuntime().map(fn, tasks)
        self.tasks.extend(tasks)
        self.results.extend(out)
        return out
