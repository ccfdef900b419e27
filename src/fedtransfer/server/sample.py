"""Seeded cohort samplers: the cohort of round r depends only on (run seed, round)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedtransfer.errors import ConfigError
from fedtransfer.seeding import derive_seed


@runtime_checkable
class Sampler(Protocol):
    """Chooses the cohort of a round from the population."""

    def sample(self, population: Sequence[str], *, seed: int, round: int) -> list[str]:
        """Client ids of the cohort, in population order."""


@dataclass(frozen=True)
class Uniform:
    """``clients_per_round`` clients uniformly without replacement.

    >>> Uniform(2).sample(["a", "b", "c"], seed=0, round=1) == Uniform(2).sample(
    ...     ["a", "b", "c"], seed=0, round=1)
    True
    """

    clients_per_round: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.clients_per_round, bool) or self.clients_per_round < 1:
            raise ConfigError(
                f"Uniform: clients_per_round must be >= 1, got {self.clients_per_round}"
            )

    def sample(self, population: Sequence[str], *, seed: int, round: int) -> list[str]:
        if self.clients_per_round > len(population):
            raise ConfigError(
                f"Uniform: clients_per_round={self.clients_per_round} exceeds the population of "
                f"{len(population)} clients; lower clients_per_round"
            )
        rng = np.random.default_rng(derive_seed(seed, "cohort", round))
        chosen = rng.choice(len(population), size=self.clients_per_round, replace=False)
        return [population[i] for i in sorted(chosen.tolist())]


@dataclass(frozen=True)
class AllClients:
    """Every client, every round (cross-silo)."""

    def sample(self, population: Sequence[str], *, seed: int, round: int) -> list[str]:
        return list(population)
