"""Partitioners: pure, seeded functions from labels to per-client index arrays.

Each returns ``num_clients`` sorted ``int64`` arrays that together hold every index once.
The dataclasses (``IID``, ``Dirichlet``, ``Shards``, ``QuantitySkew``) are their config form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedtransfer.seeding import derive_seed

Parts = list[np.ndarray]


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, "partition", name))


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"partition: labels must be 1-D, got shape {labels.shape}")
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"partition: num_clients must be an integer >= 1, got {num_clients!r}")
    if len(labels) < num_clients:
        raise ValueError(
            f"partition: {len(labels)} examples cannot fill {num_clients} clients; use fewer clients"
        )
    return labels


def _finish(parts: list[list[int]] | Parts) -> Parts:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, num_clients: int, *, seed: int) -> Parts:
    """Shuffle and deal indices into ``num_clients`` near-equal parts.

    >>> [len(p) for p in iid(np.arange(10) % 2, 3, seed=0)]
    [4, 3, 3]
    """
    labels = _check(labels, num_clients)
    order = _rng(seed, "iid").permutation(len(labels))
    return _finish(np.array_split(order, num_clients))


def dirichlet(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int = 10
) -> Parts:
    """Label skew: each class is split over clients by proportions drawn from Dirichlet(α).

    Small α gives each client few classes (Hsu et al., arXiv 1909.06335). Draws are repeated
    (deterministically) until every client holds at least ``min_size`` examples.
    """
    labels = _check(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ValueError(
            f"dirichlet: min_size {min_size} × {num_clients} clients exceeds {len(labels)} examples"
        )
    rng = _rng(seed, f"dirichlet-{alpha}")
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"dirichlet: no draw in 1000 gave every client >= {min_size} examples "
        f"(alpha={alpha}, {num_clients} clients); lower min_size or use fewer clients"
    )


def shards(labels: np.ndarray, num_clients: int, *, shards_per_client: int, seed: int) -> Parts:
    """Pathological label skew (McMahan et al., arXiv 1602.05629): sort by label, cut into
    ``num_clients × shards_per_client`` shards, give each client ``shards_per_client`` of them,
    so a client sees at most ``shards_per_client`` labels (more only where a shard straddles two).
    """
    labels = _check(labels, num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards: shards_per_client must be >= 1, got {shards_per_client}")
    rng = _rng(seed, f"shards-{shards_per_client}")
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[i] for i in row]) for row in deal])


def quantity_skew(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int = 10
) -> Parts:
    """IID labels, unequal sizes: client shares drawn from Dirichlet(α), at least ``min_size`` each."""
    labels = _check(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"quantity_skew: alpha must be > 0, got {alpha}")
    n = len(labels)
    if min_size * num_clients > n:
        raise ValueError(
            f"quantity_skew: min_size {min_size} × {num_clients} clients exceeds {n} examples"
        )
    rng = _rng(seed, f"quantity-{alpha}")
    spare = n - min_size * num_clients
    sizes = min_size + np.floor(rng.dirichlet(np.full(num_clients, alpha)) * spare).astype(int)
    sizes[: n - sizes.sum()] += 1
    order = rng.permutation(n)
    return _finish(np.split(order, np.cumsum(sizes)[:-1]))


def _check_positive(owner: object, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"{type(owner).__name__}: {name} must be > 0, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{type(owner).__name__}: {name} must be finite, got {value!r}")


@dataclass(frozen=True)
class IID:
    """Config form of :func:`iid`."""

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> Parts:
        return iid(labels, num_clients, seed=seed)


@dataclass(frozen=True)
class Dirichlet:
    """Config form of :func:`dirichlet`."""

    alpha: float = 0.3
    min_size: int = 10

    def __post_init__(self) -> None:
        _check_positive(self, alpha=self.alpha, min_size=self.min_size)

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> Parts:
        return dirichlet(labels, num_clients, alpha=self.alpha, seed=seed, min_size=self.min_size)


@dataclass(frozen=True)
class Shards:
    """Config form of :func:`shards`."""

    shards_per_client: int = 2

    def __post_init__(self) -> None:
        _check_positive(self, shards_per_client=self.shards_per_client)

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> Parts:
        return shards(labels, num_clients, shards_per_client=self.shards_per_client, seed=seed)


@dataclass(frozen=True)
class QuantitySkew:
    """Config form of :func:`quantity_skew`."""

    alpha: float = 0.5
    min_size: int = 10

    def __post_init__(self) -> None:
        _check_positive(self, alpha=self.alpha, min_size=self.min_size)

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> Parts:
        return quantity_skew(
            labels, num_clients, alpha=self.alpha, seed=seed, min_size=self.min_size
        )


@dataclass(frozen=True)
class Natural:
    """The source's own clients (FEMNIST's writers, a dataset's user column), with their own
    train/test split: the experiment takes the first ``num_clients`` of them. Only sources
    with natural clients (a ``load_federated()`` method) accept it."""

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> Parts:
        raise ValueError(
            "Natural: the partition comes from the source itself (its writers or users); use "
            "it with a source that has natural clients, such as {kind: femnist}"
        )


@runtime_checkable
class Partitioner(Protocol):
    """Labels, client count and seed to per-client index arrays."""

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int) -> Parts:
        """The partition."""
