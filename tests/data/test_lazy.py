"""Lazy populations: the same data as the eager population, read only for the clients accessed,
through a bounded cache; rounds on them equal rounds on the eager data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import make_tiny_data, make_tiny_model

from fedtransfer import (
    CompatibilityError,
    ConfigError,
    LocalTraining,
    ServerState,
    fedavg,
    run_round,
    tree,
)
from fedtransfer.data import (
    FederatedDataset,
    LazySplit,
    TensorData,
    federate,
    open_lazy_population,
    write_lazy_population,
)
from fedtransfer.runtime import SerialRuntime
from fedtransfer.transfer import PersonalHead

pytestmark = pytest.mark.usefixtures("single_thread")

EAGER = make_tiny_data()


def _same(a: TensorData, b: TensorData) -> bool:
    return (
        a.x.dtype == b.x.dtype
        and a.y.dtype == b.y.dtype
        and torch.equal(a.x, b.x)
        and torch.equal(a.y, b.y)
    )


@pytest.fixture
def lazy(tmp_path: Path) -> FederatedDataset:
    return open_lazy_population(write_lazy_population(tmp_path / "pop", EAGER), cache_size=2)


def test_lazy_population_equals_the_eager_population(lazy: FederatedDataset) -> None:
    assert lazy.clients == EAGER.clients and lazy.num_classes == EAGER.num_classes
    for c in EAGER.clients:
        assert _same(lazy.train[c], EAGER.train[c]), c
        assert _same(lazy.test[c], EAGER.test[c]), c
    assert _same(lazy.pooled_test(), EAGER.pooled_test())
    assert _same(lazy.pooled_train(), EAGER.pooled_train())
    assert np.array_equal(lazy.label_counts("test"), EAGER.label_counts("test"))


def test_lazy_population_of_uneven_clients_and_other_dtypes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 255, (40, 3, 2), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (40,), generator=gen, dtype=torch.int32)
    parts = [np.arange(0, 5), np.arange(5, 7), np.arange(7, 40)]
    eager = federate(TensorData(x, y), parts, num_classes=4, test_fraction=0.3, seed=0)
    lazy = open_lazy_population(write_lazy_population(tmp_path, eager))
    for c in eager.clients:
        assert _same(lazy.train[c], eager.train[c]) and _same(lazy.test[c], eager.test[c]), c


def test_lazy_population_reads_only_the_clients_accessed(lazy: FederatedDataset) -> None:
    train, test = lazy.train, lazy.test
    assert isinstance(train, LazySplit) and isinstance(test, LazySplit)
    assert list(train) == list(EAGER.clients) and len(train) == len(EAGER.clients)
    assert "c1" in train and "nobody" not in train
    assert (train.reads, test.reads, train.cached()) == (0, 0, ())
    train["c3"]
    assert (train.reads, test.reads, train.cached()) == (1, 0, ("c3",))
    train["c3"]  # a cache hit: no second read
    assert train.reads == 1
    with pytest.raises(KeyError):
        train["nobody"]


def test_lazy_split_cache_holds_at_most_cache_size_clients(lazy: FederatedDataset) -> None:
    train = lazy.train
    assert isinstance(train, LazySplit)
    sizes = []
    for c in [*EAGER.clients, *EAGER.clients]:
        train[c]
        sizes.append(len(train.cached()))
    assert max(sizes) == 2 and train.cached() == EAGER.clients[-2:]
    assert train.reads == 2 * len(EAGER.clients)  # LRU of 2 over a cycle of 5: every read misses


def test_write_lazy_population_streams_triples(tmp_path: Path) -> None:
    triples = ((c, EAGER.train[c], EAGER.test[c]) for c in EAGER.clients)
    root = write_lazy_population(tmp_path, triples, num_classes=EAGER.num_classes)
    lazy = open_lazy_population(root)
    assert all(_same(lazy.train[c], EAGER.train[c]) for c in EAGER.clients)
    meta = json.loads((root / "population.json").read_text())
    assert meta["num_examples"] == sum(
        len(EAGER.train[c]) + len(EAGER.test[c]) for c in EAGER.clients
    )
    offsets = np.load(root / "offsets.npy", allow_pickle=False)
    assert offsets.shape == (len(EAGER.clients), 3) and offsets.dtype == np.int64


def test_write_lazy_population_needs_num_classes_for_triples(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        write_lazy_population(tmp_path, [("a", EAGER.train["c0"], EAGER.test["c0"])])


def test_write_lazy_population_refuses_a_directory_that_holds_one(tmp_path: Path) -> None:
    write_lazy_population(tmp_path, EAGER)
    with pytest.raises(ConfigError, match="already holds"):
        write_lazy_population(tmp_path, EAGER)


def test_write_lazy_population_rejects_mismatched_shapes(tmp_path: Path) -> None:
    odd = TensorData(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.int64))
    triples = [("a", EAGER.train["c0"], EAGER.test["c0"]), ("b", odd, odd)]
    with pytest.raises(ConfigError, match="client 'b' train"):
        write_lazy_population(tmp_path, triples, num_classes=3)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_write_lazy_population_rejects_duplicate_clients(tmp_path: Path) -> None:
    triples = [("a", EAGER.train["c0"], EAGER.test["c0"])] * 2
    with pytest.raises(ConfigError, match="twice"):
        write_lazy_population(tmp_path, triples, num_classes=3)


def test_open_lazy_population_without_one_raises(tmp_path: Path) -> None:
    with pytest.raises(CompatibilityError, match=r"population\.json"):
        open_lazy_population(tmp_path)


def test_open_lazy_population_detects_a_truncated_file(tmp_path: Path) -> None:
    root = write_lazy_population(tmp_path, EAGER)
    data = (root / "x.bin").read_bytes()
    (root / "x.bin").write_bytes(data[: len(data) // 2])
    lazy = open_lazy_population(root)
    with pytest.raises(CompatibilityError, match="truncated"):
        lazy.test[EAGER.clients[-1]]


def test_rounds_on_a_lazy_population_equal_rounds_on_the_eager_one(
    lazy: FederatedDataset,
) -> None:
    recipe = fedavg(
        PersonalHead(), training=LocalTraining(lr=0.1, steps=2, batch_size=8), clients_per_round=3
    )
    states = []
    for data in (EAGER, lazy):
        state = ServerState.initial(recipe, make_tiny_model(), seed=0)
        for _ in range(3):
            state, _ = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
        states.append(state)
    assert tree.equal(states[0].params, states[1].params)
    assert all(
        tree.equal(states[0].holdings.local[c], states[1].holdings.local[c])
        for c in states[0].holdings.local
    )
    train = lazy.train
    assert isinstance(train, LazySplit) and 0 < train.reads <= 9 and lazy.test.reads == 0  # type: ignore[attr-defined]
