"""Unit tests for the seeded partitioners in :mod:`fedtransfer.data.partition`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedtransfer.data import IID, Dirichlet, QuantitySkew, Shards
from fedtransfer.data.partition import dirichlet, iid, quantity_skew, shards

NUM_CLASSES, PER_CLASS, NUM_CLIENTS = 10, 60, 10
LABELS = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)  # 600 examples, balanced

Partitioner = Callable[[np.ndarray, int, int], list[np.ndarray]]

PARTITIONERS: dict[str, Partitioner] = {
    "iid": lambda y, n, seed: iid(y, n, seed=seed),
    "dirichlet": lambda y, n, seed: dirichlet(y, n, alpha=0.5, seed=seed, min_size=5),
    "shards": lambda y, n, seed: shards(y, n, shards_per_client=2, seed=seed),
    "quantity_skew": lambda y, n, seed: quantity_skew(y, n, alpha=0.5, seed=seed, min_size=5),
}


@pytest.fixture(params=list(PARTITIONERS), ids=list(PARTITIONERS))
def partition(request: pytest.FixtureRequest) -> Partitioner:
    return PARTITIONERS[request.param]


def _classes_per_client(parts: list[np.ndarray]) -> list[int]:
    return [len(np.unique(LABELS[p])) for p in parts]


def test_partition_returns_one_part_per_client(partition: Partitioner) -> None:
    assert len(partition(LABELS, NUM_CLIENTS, 0)) == NUM_CLIENTS


def test_partition_holds_every_index_exactly_once(partition: Partitioner) -> None:
    parts = partition(LABELS, NUM_CLIENTS, 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_partition_parts_are_sorted_int64(partition: Partitioner) -> None:
    parts = partition(LABELS, NUM_CLIENTS, 0)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_partition_is_deterministic_for_a_seed(partition: Partitioner) -> None:
    a, b = partition(LABELS, NUM_CLIENTS, 7), partition(LABELS, NUM_CLIENTS, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_partition_differs_for_another_seed(partition: Partitioner) -> None:
    a, b = partition(LABELS, NUM_CLIENTS, 7), partition(LABELS, NUM_CLIENTS, 8)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_partition_does_not_depend_on_global_numpy_rng(partition: Partitioner) -> None:
    np.random.seed(1)
    a = partition(LABELS, NUM_CLIENTS, 3)
    np.random.seed(2)
    b = partition(LABELS, NUM_CLIENTS, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("config", "function"),
    [
        (IID(), PARTITIONERS["iid"]),
        (Dirichlet(alpha=0.5, min_size=5), PARTITIONERS["dirichlet"]),
        (Shards(shards_per_client=2), PARTITIONERS["shards"]),
        (QuantitySkew(alpha=0.5, min_size=5), PARTITIONERS["quantity_skew"]),
    ],
    ids=["iid", "dirichlet", "shards", "quantity_skew"],
)
def test_partition_config_form_matches_function(config: Partitioner, function: Partitioner) -> None:
    a, b = config(LABELS, NUM_CLIENTS, 4), function(LABELS, NUM_CLIENTS, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(np.arange(103) % 3, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    skewed = dirichlet(LABELS, NUM_CLIENTS, alpha=0.05, seed=0, min_size=5)
    uniform = dirichlet(LABELS, NUM_CLIENTS, alpha=100.0, seed=0, min_size=5)
    assert np.mean(_classes_per_client(skewed)) < np.mean(_classes_per_client(uniform)) - 3


def test_dirichlet_respects_min_size() -> None:
    parts = dirichlet(LABELS, NUM_CLIENTS, alpha=0.1, seed=0, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_impossible_min_size_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no draw"):
        dirichlet(LABELS, NUM_CLIENTS, alpha=0.01, seed=0, min_size=PER_CLASS)


def test_shards_gives_at_most_k_labels_per_client() -> None:
    for k in (1, 2, 3):
        parts = shards(LABELS, NUM_CLIENTS, shards_per_client=k, seed=0)
        assert max(_classes_per_client(parts)) <= k


def test_shards_one_per_client_gives_single_label_clients() -> None:
    parts = shards(LABELS, NUM_CLIENTS, shards_per_client=1, seed=0)
    assert _classes_per_client(parts) == [1] * NUM_CLIENTS


def test_quantity_skew_sizes_sum_to_n_and_respect_min_size() -> None:
    for seed in range(5):
        parts = quantity_skew(LABELS, NUM_CLIENTS, alpha=0.3, seed=seed, min_size=12)
        sizes = [len(p) for p in parts]
        assert sum(sizes) == len(LABELS) and min(sizes) >= 12


def test_quantity_skew_small_alpha_gives_unequal_sizes() -> None:
    sizes = [len(p) for p in quantity_skew(LABELS, NUM_CLIENTS, alpha=0.2, seed=0, min_size=5)]
    assert max(sizes) > 2 * min(sizes)


@pytest.mark.parametrize(
    "call",
    [
        lambda: iid(LABELS.reshape(60, 10), 2, seed=0),
        lambda: iid(LABELS, 0, seed=0),
        lambda: iid(LABELS, 2.0, seed=0),
        lambda: iid(LABELS[:3], 4, seed=0),
        lambda: dirichlet(LABELS, 4, alpha=0.0, seed=0),
        lambda: dirichlet(LABELS, 4, alpha=-1.0, seed=0),
        lambda: dirichlet(LABELS, 10, alpha=1.0, seed=0, min_size=61),
        lambda: shards(LABELS, 4, shards_per_client=0, seed=0),
        lambda: quantity_skew(LABELS, 4, alpha=0.0, seed=0),
        lambda: quantity_skew(LABELS, 10, alpha=1.0, seed=0, min_size=61),
    ],
    ids=[
        "labels-2d",
        "zero-clients",
        "float-clients",
        "more-clients-than-examples",
        "dirichlet-alpha-zero",
        "dirichlet-alpha-negative",
        "dirichlet-min-size-too-large",
        "shards-zero",
        "quantity-alpha-zero",
        "quantity-min-size-too-large",
    ],
)
def test_partition_bad_input_raises_value_error(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()
