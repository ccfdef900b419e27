"""Shared by the fast-path tests: small models the vectorised path trains (or must decline), a
population of clients of different sizes, and runs of a recipe on a runtime compared with
the serial runtime's (within the declared tolerance, or exactly where the path declines)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from fedtransfer import LocalTraining, Recipe, Reply, ServerState, run_round, tree
from fedtransfer.client.fast import TOLERANCE
from fedtransfer.codecs import Payload
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import SerialRuntime, VectorizedRuntime
from fedtransfer.server import AllClients

ROUNDS = 5
SIZES = (5, 17, 40, 33, 8, 64)  # different sizes: different step counts and short last batches
LOGGER = "fedtransfer.client.fast.vectorized"
"""Where the vectorised path says why it declines."""


class MLP(nn.Module):
    """8x8 inputs ▸ two hidden layers ▸ a 3-class head; no dropout, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh()
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DropoutMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.body.append(nn.Dropout(0.3))


class NoisyMLP(MLP):
    """Draws from the global generator in its forward, with no Dropout module to see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + 0.01 * torch.randn_like(out) if self.training else out


class CountingMLP(MLP):
    """Updates a buffer of its own in train mode (as BatchNorm does, without being one)."""

    calls: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls.add_(1)
        return super().forward(x)


def make_counting_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return CountingMLP()


class ConvNet(nn.Module):
    """A small convolutional net on 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(x.flatten(-3))


def make_conv_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return ConvNet()


def make_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return MLP()


def make_dropout_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return DropoutMLP()


def make_noisy_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return NoisyMLP()


def make_data(sizes: Sequence[int] = SIZES) -> FederatedDataset:
    gen = torch.Generator().manual_seed(0)
    train, test = {}, {}
    for i, n in enumerate(sizes):
        x = torch.randn(n + 4, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (n + 4,), generator=gen)
        x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float()
        train[f"c{i}"] = TensorData(x[:n], y[:n])
        test[f"c{i}"] = TensorData(x[n:], y[n:])
    return FederatedDataset(train, test, 3)


@dataclass
class Twin:
    """A runtime that runs every cohort both ways: returns the serial results and keeps the
    vectorised ones beside them (``fn.batch`` must accept every cohort)."""

    pairs: list[tuple[Reply, Reply]] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        serial = [fn(t) for t in tasks]
        batched = fn.batch(tasks)  # type: ignore[attr-defined]
        assert batched is not None, "the vectorised path declined this cohort"
        self.pairs += list(zip(serial, batched, strict=True))
        return serial


@dataclass
class Spy:
    """Counts vectorised calls that trained (returned results) and that declined (None), and
    the clients run one by one through ``client_update``."""

    batched: int = 0
    declined: int = 0
    serial: int = 0


def run(
    recipe: Recipe,
    runtime: Any,  # a Runtime, or one of the recording runtimes here
    model_fn: Callable[[], nn.Module] = make_mlp,
    data: FederatedDataset | None = None,
    rounds: int = ROUNDS,
    seed: int = 3,
) -> tuple[ServerState, list[Any]]:
    data = data or make_data()
    state = ServerState.initial(recipe, model_fn(), seed=seed)
    reports = []
    for _ in range(rounds):
        state, report = run_round(recipe, state, data, runtime, model_fn=model_fn)
        reports.append(report)
    return state, reports


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def assert_close_runs(
    recipe: Recipe, model_fn: Callable[[], nn.Module] = make_mlp, spy: Spy | None = None
) -> None:
    """Serial and vectorised runs of ``recipe``: same weights (within ``TOLERANCE``), bytes,
    steps, losses."""
    ref, ref_reports = run(recipe, SerialRuntime(), model_fn)
    if spy is not None:
        spy.serial = 0
    got, reports = run(recipe, VectorizedRuntime(), model_fn)
    assert not tree.equal(ref.params, ServerState.initial(recipe, model_fn(), seed=3).params)
    assert max_diff(ref.params, got.params) <= TOLERANCE
    assert ref.holdings.local.keys() == got.holdings.local.keys()
    for c in ref.holdings.local:
        assert max_diff(ref.holdings.local[c], got.holdings.local[c]) <= TOLERANCE
    for a, b in zip(ref_reports, reports, strict=True):
        assert (a.bytes_up, a.bytes_down, a.accepted, a.rejected) == (
            b.bytes_up,
            b.bytes_down,
            b.accepted,
            b.rejected,
        )
        assert a.metrics["client/steps"] == b.metrics["client/steps"]
        assert a.metrics["client/train_loss"] == pytest.approx(
            b.metrics["client/train_loss"], abs=TOLERANCE
        )
    if spy is not None:
        assert spy.batched == ROUNDS and spy.declined == 0 and spy.serial == 0


def decoded(recipe: Recipe, res: Reply) -> dict[str, torch.Tensor]:
    return recipe.uplink.decode(Payload.from_bytes(res.uplink))


def assert_same_clients(recipe: Recipe, model_fn: Callable[[], nn.Module] = make_mlp) -> Twin:
    """Every client result of every round, vectorised vs serial: within ``TOLERANCE``, equal
    sizes."""
    twin = Twin()
    run(recipe, twin, model_fn)
    assert len(twin.pairs) == ROUNDS * len(SIZES)
    for s, v in twin.pairs:
        assert (s.client, s.num_examples, len(s.uplink), s.error) == (
            v.client,
            v.num_examples,
            len(v.uplink),
            v.error,
        )
        assert max_diff(decoded(recipe, s), decoded(recipe, v)) <= TOLERANCE
        assert max_diff(s.local, v.local) <= TOLERANCE
        assert max_diff(s.memory, v.memory) <= TOLERANCE
        assert s.metrics.keys() == v.metrics.keys()
        assert (s.metrics["steps"], s.metrics["examples"]) == (
            v.metrics["steps"],
            v.metrics["examples"],
        )
        assert s.metrics["loss"] == pytest.approx(v.metrics["loss"], abs=TOLERANCE)
    return twin


def recipe_with(local: LocalTraining, **kwargs: Any) -> Recipe:
    return Recipe(training=local, sampler=AllClients(), **kwargs)


PLAIN_SGD = LocalTraining(lr=0.1, epochs=2, batch_size=8)
