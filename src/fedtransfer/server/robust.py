"""Byzantine-robust aggregators: median, trimmed mean, (Multi-)Krum, Bulyan and clipping rules.

Shared conventions (cross-checked against Flower's ``flwr.server.strategy.aggregate``):

- Clients with weight 0 take no part; otherwise weights are ignored except by ``MultiKrum``
  (weighted mean of the kept updates, as Flower) and ``NormBound`` (weighted mean).
- Distances and norms are global: every floating tensor of an update is one flat vector.
- Work is done in float64; floating results come back in the updates' dtype. Non-floating
  tensors (BatchNorm's ``num_batches_tracked``) are, for every rule, the rounded sample-weighted
  mean over the participating clients, as in :func:`fedtransfer.tree.weighted_mean`.
- Exact ties between Krum scores go to the lexicographically smaller update (Flower takes the
  first client), so no result depends on the order of the clients.
- Bad settings raise :class:`~fedtransfer.errors.ConfigError` at construction; a cohort too
  small for a rule raises :class:`~fedtransfer.errors.CompatibilityError` when aggregating.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.types import Out, Params, State


def _check_count(rule: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{rule}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_radius(rule: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not 0 < value < math.inf:
        raise ConfigError(f"{rule}: {name} must be finite and > 0, got {value!r}")


def _participants(
    rule: str, updates: Sequence[Params], weights: Sequence[float]
) -> tuple[list[Params], list[float]]:
    """The updates and weights of the clients with positive weight, checked for consistency."""
    if len(updates) != len(weights):
        raise ValueError(f"{rule}: {len(updates)} updates but {len(weights)} weights")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"{rule}: weights must be finite and >= 0, got {bad[0]}")
    kept = [i for i, w in enumerate(weights) if w > 0]
    if not kept:
        raise ValueError(f"{rule}: no update has a positive weight; expected at least one")
    ups = [updates[i] for i in kept]
    ref = ups[0]
    for u in ups[1:]:
        if u.keys() != ref.keys() or any(u[k].shape != ref[k].shape for k in ref):
            raise ValueError(f"{rule}: updates differ in keys or shapes; expected identical ones")
    return ups, [float(weights[i]) for i in kept]


def _require(rule: str, n: int, minimum: int, formula: str) -> None:
    if n < minimum:
        raise CompatibilityError(
            f"{rule}: got {n} updates with positive weight; expected at least {minimum} "
            f"({formula}); hint: sample more clients per round or lower f"
        )


def _floating(p: Params) -> list[str]:
    return [k for k, v in p.items() if v.dtype.is_floating_point]


def _stack(ups: Sequence[Params], key: str) -> Tensor:
    return torch.stack([u[key].detach().double() for u in ups])


def _assemble(ups: Sequence[Params], weights: Sequence[float], floats: Params) -> dict[str, Tensor]:
    """``floats`` cast to the updates' dtypes, plus the weighted mean of the other keys."""
    others = [k for k in ups[0] if k not in floats]
    mean = tree.weighted_mean([tree.select(u, others) for u in ups], weights) if others else {}
    return {k: floats[k].to(v.dtype) if k in floats else mean[k] for k, v in ups[0].items()}


def _per_key(
    ups: Sequence[Params], weights: Sequence[float], fn: Callable[[Tensor], Tensor]
) -> dict[str, Tensor]:
    return _assemble(ups, weights, {k: fn(_stack(ups, k)) for k in _floating(ups[0])})


def _middle(s: Tensor) -> Tensor:
    """Median of values sorted along dim 0: the mean of the two middle ones for an even count."""
    h = s.shape[0] // 2
    return s[h] if s.shape[0] % 2 else (s[h - 1] + s[h]) / 2


def _median(x: Tensor) -> Tensor:
    return _middle(x.sort(dim=0).values)


def _flat(ups: Sequence[Params]) -> Tensor:
    """Each update's floating tensors as one float64 row, in key order."""
    keys = _floating(ups[0])
    if not keys:
        return torch.zeros(len(ups), 0, dtype=torch.float64)
    return torch.stack([torch.cat([u[k].detach().double().reshape(-1) for k in keys]) for u in ups])


def _unflat(row: Tensor, like: Params) -> dict[str, Tensor]:
    """Inverse of :func:`_flat` for one row: floating tensors shaped as in ``like``."""
    keys = _floating(like)
    parts = row.split([like[k].numel() for k in keys])
    return {k: p.reshape(like[k].shape) for k, p in zip(keys, parts, strict=True)}


def _sq_distances(flat: Tensor) -> Tensor:
    """Squared L2 distances between rows, exactly symmetric, with ``inf`` on the diagonal."""
    dist = torch.stack([(flat - row).pow(2).sum(dim=1) for row in flat])
    return dist + torch.diag(
        torch.full((len(flat),), math.inf, dtype=dist.dtype, device=dist.device)
    )


def _krum_order(flat: Tensor, dist: Tensor, f: int, weights: Sequence[float]) -> list[int]:
    """Rows by increasing Krum score: the sum of squared distances to the ``max(1, n − f − 2)``
    nearest other rows (Flower's count). Exact ties (certain when that count is 1: a nearest
    pair shares its distance) go to the lexicographically smaller row, then the smaller weight.
    """
    n = flat.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    scores = dist.sort(dim=1).values[:, :k].sum(dim=1).tolist()

    def cmp(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        differ = (flat[i] != flat[j]).nonzero()
        if len(differ):
            d = int(differ[0])
            return -1 if flat[i, d] < flat[j, d] else 1
        return (weights[i] > weights[j]) - (weights[i] < weights[j])

    return sorted(range(n), key=functools.cmp_to_key(cmp))


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median (Yin et al. 2018, arXiv 1803.01498), as Flower's ``FedMedian``.

    >>> import torch
    >>> ups = [{"w": torch.tensor([1.0, 9.0])}, {"w": torch.tensor([2.0, 0.0])},
    ...        {"w": torch.tensor([100.0, 4.0])}, {"w": torch.tensor([3.0, 5.0])}]
    >>> Median().aggregate(ups, [1, 1, 1, 1], {}).value
    {'w': tensor([2.5000, 4.5000])}
    """

    linear: ClassVar[bool] = False

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        ups, ws = _participants("Median", updates, weights)
        return Out(_per_key(ups, ws, _median), state, {"clients": float(len(ups))})


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise mean after dropping the ``int(beta·n)`` largest and smallest values.

    Yin et al. 2018 (arXiv 1803.01498); the cut is Flower's ``FedTrimmedAvg`` (scipy's
    ``trim_mean``). ``beta`` is in [0, 0.5); with ``beta·n < 1`` nothing is trimmed.

    >>> import torch
    >>> ups = [{"w": torch.tensor([x])} for x in (1.0, 2.0, 3.0, -50.0, 60.0)]
    >>> TrimmedMean(beta=0.2).aggregate(ups, [1] * 5, {}).value
    {'w': tensor([2.])}
    """

    beta: float = 0.1
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"TrimmedMean: beta must be in [0, 0.5), got {self.beta!r}")

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        ups, ws = _participants(repr(self), updates, weights)
        n = len(ups)
        cut = int(self.beta * n)

        def trim(x: Tensor) -> Tensor:
            return x.sort(dim=0).values[cut : n - cut].mean(dim=0)

        return Out(_per_key(ups, ws, trim), state, {"clients": float(n), "trimmed": 2.0 * cut})


@dataclass(frozen=True)
class Krum:
    """The update with the lowest Krum score (Blanchard et al. 2017, arXiv 1703.02757).

    A score is the sum of squared distances to the ``n - f - 2`` nearest other updates; needs
    ``n >= 2f + 3`` clients. Weights are ignored (as in Flower).

    >>> import torch
    >>> ups = [{"w": torch.tensor([x])} for x in (0.0, 1.0, 3.0, 7.0, 100.0)]
    >>> Krum(f=1).aggregate(ups, [1] * 5, {}).value
    {'w': tensor([1.])}
    """

    f: int = 1
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_count("Krum", "f", self.f, 0)

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        ups, ws = _participants(repr(self), updates, weights)
        _require(repr(self), len(ups), 2 * self.f + 3, "2f + 3")
        flat = _flat(ups)
        best = _krum_order(flat, _sq_distances(flat), self.f, ws)[0]
        floats = {k: ups[best][k] for k in _floating(ups[0])}
        return Out(_assemble(ups, ws, floats), state, {"clients": float(len(ups)), "selected": 1.0})


@dataclass(frozen=True)
class MultiKrum:
    """Sample-weighted mean of the ``m`` updates with the lowest Krum scores (arXiv 1703.02757).

    The weighted mean of the kept updates is Flower's (``aggregate_krum`` and the ``MultiKrum``
    strategy). ``m=None`` keeps ``n - f``; needs ``n >= 2f + 3`` and ``m <= n - f`` (keeping more
    would keep an attacker).

    >>> import torch
    >>> ups = [{"w": torch.tensor([x])} for x in (0.0, 1.0, 2.5, 4.0, 100.0)]
    >>> MultiKrum(f=1, m=2).aggregate(ups, [1, 3, 1, 1, 1], {}).value
    {'w': tensor([1.3750])}
    """

    f: int = 1
    m: int | None = None
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_count("MultiKrum", "f", self.f, 0)
        if self.m is not None:
            _check_count("MultiKrum", "m", self.m, 1)

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        rule = repr(self)
        ups, ws = _participants(rule, updates, weights)
        n = len(ups)
        _require(rule, n, 2 * self.f + 3, "2f + 3")
        m = n - self.f if self.m is None else self.m
        _require(rule, n, m + self.f, "m + f")
        flat = _flat(ups)
        keep = _krum_order(flat, _sq_distances(flat), self.f, ws)[:m]
        keys = _floating(ups[0])
        floats = tree.weighted_mean(
            [tree.select(ups[i], keys) for i in keep], [ws[i] for i in keep]
        )
        value = _assemble(ups, ws, floats)
        return Out(value, state, {"clients": float(n), "selected": float(m)})


@dataclass(frozen=True)
class Bulyan:
    """Bulyan over Krum (El Mhamdi et al. 2018, arXiv 1802.07927), as Flower's ``aggregate_bulyan``.

    Selects ``θ = n - 2f`` updates by Krum, one at a time, re-scoring the rest after each
    choice; then per coordinate averages the ``β = θ - 2f`` selected values nearest to their
    median (of two equally near, the smaller). Needs ``n >= 4f + 3``. Weights are ignored.

    >>> import torch
    >>> ups = [{"w": torch.tensor([x])} for x in (-2.0, 0.0, 1.0, 3.0, 7.0, 60.0, 100.0)]
    >>> Bulyan(f=1).aggregate(ups, [1] * 7, {}).value
    {'w': tensor([1.3333])}
    """

    f: int = 1
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_count("Bulyan", "f", self.f, 0)

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        ups, ws = _participants(repr(self), updates, weights)
        n = len(ups)
        _require(repr(self), n, 4 * self.f + 3, "4f + 3")
        theta, beta = n - 2 * self.f, n - 4 * self.f
        flat, rest, chosen = _flat(ups), list(range(n)), []
        dist = _sq_distances(flat)
        for _ in range(theta):
            sub = dist[rest][:, rest]
            best = rest[_krum_order(flat[rest], sub, self.f, [ws[i] for i in rest])[0]]
            chosen.append(best)
            rest.remove(best)

        def nearest_mean(x: Tensor) -> Tensor:
            s = x.sort(dim=0).values  # then a stable argsort keeps the smaller of a tied pair
            idx = (s - _middle(s)).abs().argsort(dim=0, stable=True)[:beta]
            return s.gather(0, idx).mean(dim=0)

        floats = {k: nearest_mean(_stack([ups[i] for i in chosen], k)) for k in _floating(ups[0])}
        value = _assemble(ups, ws, floats)
        return Out(value, state, {"clients": float(n), "selected": float(theta)})
