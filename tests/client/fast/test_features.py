"""Frozen-trunk feature caching: head-only training on cached features gives exactly the
weights of training the whole model, falls back when it cannot be exact, and is invalidated
when the trunk changes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_data, make_tiny_model
from torch import nn

from fedtransfer import LocalTraining, Recipe, ServerState, run_round, tree
from fedtransfer.client.fast import features
from fedtransfer.client.fast.features import head_path, no_feature_cache, train_head_cached
from fedtransfer.client.train import local_train
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.rounds.schedule import Schedule, as_schedule
from fedtransfer.runtime import SerialRuntime
from fedtransfer.seeding import generator
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full, HeadOnly, Lora

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = LocalTraining(lr=0.1, momentum=0.9, epochs=2, batch_size=8)


class DropoutTrunk(nn.Module):
    """Dropout outside the frozen body stays active in training: the features are not the
    same twice, so they cannot be cached."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


class HeadWithNorm(nn.Module):
    """The head has BatchNorm: its statistics must not move while features are read."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _rounds(
    recipe: Recipe | Schedule,
    model_fn: Callable[[], nn.Module],
    cached: bool,
    data: FederatedDataset | None = None,
) -> ServerState:
    state = as_schedule(recipe).start(model_fn(), seed=0)
    data = data or make_tiny_data()
    for _ in range(3):
        if cached:
            state, _ = run_round(recipe, state, data, SerialRuntime(), model_fn=model_fn)
        else:
            with no_feature_cache():
                state, _ = run_round(recipe, state, data, SerialRuntime(), model_fn=model_fn)
    return state


def _seeded(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return cls()

    return make


@pytest.mark.parametrize(
    "model_fn",
    [make_tiny_model, _seeded(HeadWithNorm), _seeded(DropoutTrunk)],
    ids=["tiny", "head-with-batchnorm", "dropout-trunk"],
)
def test_round_head_only_with_cache_equals_without(model_fn: Callable[[], nn.Module]) -> None:
    recipe = Recipe(policy=HeadOnly(), training=SPEC, sampler=AllClients())
    cached, plain = _rounds(recipe, model_fn, True), _rounds(recipe, model_fn, False)
    assert tree.equal(cached.params, plain.params)
    assert tree.equal(cached.weights_for(), plain.weights_for())


def test_head_path_is_the_module_holding_every_trainable_key() -> None:
    model = make_tiny_model()
    assert head_path(model, HeadOnly().plan(model)) == "head"
    assert head_path(model, Full().plan(model)) is None
    lora = Lora(rank=2, train=("head",))
    prepared = lora.prepare(make_tiny_model())
    assert head_path(prepared, lora.plan(prepared)) is None


def _train(model: nn.Module, data: TensorData) -> dict[str, float] | None:
    plan = HeadOnly().plan(model)
    return train_head_cached(model, plan, data, SPEC, generator=generator(0, "t"))


def test_train_head_cached_falls_back_when_the_trunk_is_random() -> None:
    model = _seeded(DropoutTrunk)()
    assert _train(model, make_tiny_data().train["c0"]) is None


@contextlib.contextmanager
def _counting_computes(calls: list[int]) -> Iterator[None]:
    """Appends to ``calls`` each time the cache computes a trunk's features."""
    original = features._compute

    def counting(*args: object) -> torch.Tensor | None:
        calls.append(1)
        return original(*args)  # type: ignore[arg-type]

    features._compute = counting  # type: ignore[assignment]
    try:
        yield
    finally:
        features._compute = original  # type: ignore[assignment]


def test_train_head_cached_matches_local_train_and_reuses_features() -> None:
    data = make_tiny_data().train["c0"]
    model, reference = make_tiny_model(), make_tiny_model()
    calls: list[int] = []
    with _counting_computes(calls):
        start = tree.clone(model.state_dict())
        first = _train(model, data)
        model.load_state_dict(start)
        second = _train(model, data)
    expected = local_train(
        reference, HeadOnly().plan(reference), data, SPEC, generator=generator(0, "t")
    )
    assert first == second == expected
    assert tree.equal(model.state_dict(), reference.state_dict())
    assert calls == [1]  # the second call found the features in the cache


def test_train_head_cached_recomputes_when_the_trunk_changes() -> None:
    data = make_tiny_data().train["c0"]
    model = make_tiny_model()
    _train(model, data)
    with torch.no_grad():
        model.body[1].weight.add_(0.5)  # a new stage trained the trunk
    changed, reference = tree.clone(model.state_dict()), make_tiny_model()
    reference.load_state_dict(changed)
    _train(model, data)
    local_train(reference, HeadOnly().plan(reference), data, SPEC, generator=generator(0, "t"))
    assert tree.equal(model.state_dict(), reference.state_dict())


def test_feature_cache_spills_past_its_memory_budget_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(features, "BUDGET_BYTES", 1)
    monkeypatch.setattr(features._WORKER, "features", None, raising=False)
    monkeypatch.setenv(features.SPILL_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(features._Spill, "_dir", None)
    population = make_tiny_data()
    for _ in range(2):  # the second pass trains on features read back from the files
        for c in population.clients:
            model, reference = make_tiny_model(), make_tiny_model()
            _train(model, population.train[c])
            local_train(
                reference,
                HeadOnly().plan(reference),
                population.train[c],
                SPEC,
                generator=generator(0, "t"),
            )
            assert tree.equal(model.state_dict(), reference.state_dict())
    cache = features._cache()
    assert len(cache) == len(population.clients)
    spilled = [e for e in cache.values() if e.file is not None]
    assert len(spilled) == len(cache) - 1  # all but the newest live in files
    assert all(e.file is not None and e.file.parent.parent == tmp_path for e in spilled)
    assert sorted(p.name for p in tmp_path.glob("*/*.bin")) == sorted(
        e.file.name for e in spilled if e.file is not None
    )


def test_feature_cache_drops_spilled_files_past_its_disk_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(features, "BUDGET_BYTES", 1)
    monkeypatch.setattr(features, "DISK_BUDGET_BYTES", 1)
    monkeypatch.setattr(features._WORKER, "features", None, raising=False)
    monkeypatch.setenv(features.SPILL_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(features._Spill, "_dir", None)
    population = make_tiny_data()
    for c in population.clients:
        _train(make_tiny_model(), population.train[c])
    assert len(features._cache()) == 1  # only the newest: in memory
    assert list(tmp_path.glob("*/*.bin")) == []  # every spilled file was removed


def test_round_cache_follows_a_stage_that_retrains_the_trunk() -> None:
    """Full fine-tuning, then head only: the cached trunk is the one the first stage trained."""
    full = Recipe(policy=Full(), training=SPEC, sampler=AllClients())
    head_first = Recipe(policy=HeadOnly(), training=SPEC, sampler=AllClients())
    recipe = Schedule(((1, full), (None, head_first)))
    data = make_tiny_data()  # the same client data objects throughout
    _rounds(head_first, make_tiny_model, True, data)  # caches features of the starting trunk
    cached = _rounds(recipe, make_tiny_model, True, data)
    plain = _rounds(recipe, make_tiny_model, False, data)
    assert tree.equal(cached.weights_for(), plain.weights_for())


def test_evaluate_cached_equals_evaluate_and_reuses_the_trunk_features() -> None:
    from fedtransfer.client.evaluate import evaluate
    from fedtransfer.client.fast.features import evaluate_cached

    data = make_tiny_data().test["c0"]
    model = make_tiny_model()
    plan = HeadOnly().plan(model)
    calls: list[int] = []
    with _counting_computes(calls):
        first = evaluate_cached(model, plan, data)
        with torch.no_grad():
            model.head.weight.mul_(-1.0)  # a new head, the same trunk
        second = evaluate_cached(model, plan, data)
        expected = evaluate(model, data)
        assert calls == [1]
        with torch.no_grad():
            model.body[1].weight.add_(0.5)  # the trunk changed: computed again
        third = evaluate_cached(model, plan, data)
        assert calls == [1, 1]
    assert first is not None and second is not None and third is not None
    assert second["accuracy"] == expected["accuracy"]
    assert second["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert third == pytest.approx(evaluate(model, data), rel=1e-6)
    assert evaluate_cached(model, Full().plan(model), data) is None  # nothing frozen
    random_trunk = _seeded(DropoutTrunk)()
    assert evaluate_cached(random_trunk, HeadOnly().plan(random_trunk), data) is None
