"""Aggregators: many client updates to one. ``Mean`` is sample-weighted FedAvg."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor

from fedtransfer import tree
from fedtransfer.types import Out, Params, State


@runtime_checkable
class Aggregator(Protocol):
    """Combines updates: ``init(params) -> state``, ``aggregate(updates, weights, state) -> Out``.

    ``linear`` is True when the result is a weighted sum of the updates (secure aggregation
    can only compute those).
    """

    linear: ClassVar[bool]

    def init(self, params: Params) -> State:
        """Initial state for shared parameters ``params``."""

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        """One aggregated update from ``updates`` weighted by ``weights``."""


@dataclass(frozen=True)
class Mean:
    """Sample-weighted mean of updates: FedAvg (McMahan et al., arXiv 1602.05629).

    Set ``weighted=False`` for the unweighted mean.

    >>> import torch
    >>> out = Mean().aggregate([{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}], [3, 1], {})
    >>> out.value
    {'w': tensor([1.7500])}
    """

    weighted: bool = True
    linear: ClassVar[bool] = True

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        w = list(weights) if self.weighted else [1.0 if x > 0 else 0.0 for x in weights]
        return Out(tree.weighted_mean(updates, w), state, {"clients": float(len(updates))})
