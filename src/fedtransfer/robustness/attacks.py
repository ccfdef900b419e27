"""Simulated Byzantine attacks (data poisoning and model poisoning) for robustness evaluation.

An :class:`Attack` acts at two points of a round: ``poison`` changes the training data of each
malicious client before local training, and ``corrupt`` replaces the decoded updates of the
malicious clients before validation and aggregation. A :class:`~fedtransfer.robustness.threat.Threat`
says which clients are malicious. Attacks act on floating tensors only; integer tensors (such as BatchNorm's
``num_batches_tracked``) are passed through from the client's own update. Inputs are never mutated.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fedtransfer.data.federated import TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.types import Params


@runtime_checkable
class Attack(Protocol):
    """A simulated attack by the malicious clients of a run."""

    def poison(
        self, data: TensorData, *, num_classes: int, generator: torch.Generator
    ) -> TensorData:
        """The training data a malicious client trains on (data attacks); model attacks return ``data``."""

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        """The updates the server receives: honest entries returned unchanged (same objects), malicious ones replaced."""


def _check_number(
    owner: str, name: str, value: float, *, low: float, strict: bool, hint: str
) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or (value <= low if strict else value < low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ConfigError(
            f"{owner}: {name} must be a finite number {bound}, got {value!r}; hint: {hint}"
        )


def _as_dict(update: Params) -> dict[str, Tensor]:
    return update if isinstance(update, dict) else dict(update)


def _replace(
    name: str,
    updates: Sequence[Params],
    malicious: Sequence[bool],
    make: Callable[[Params], dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """Honest entries as they are (same objects); malicious ones ``make(own update)``, in order."""
    if len(updates) != len(malicious):
        raise ValueError(
            f"{name}.corrupt: {len(updates)} updates but {len(malicious)} malicious flags; "
            "expected one flag per update, in the same order"
        )
    return [make(u) if m else _as_dict(u) for u, m in zip(updates, malicious, strict=True)]


def _map_floating(update: Params, fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``fn`` (computed in float64) on floating tensors, cast back; other tensors passed through."""
    return {
        k: fn(v.double()).to(v.dtype) if v.dtype.is_floating_point else v for k, v in update.items()
    }


def _statistic(
    name: str,
    updates: Sequence[Params],
    malicious: Sequence[bool],
    fn: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """``fn`` over the stacked honest updates (all updates if none is honest), per floating key."""
    reference = [u for u, m in zip(updates, malicious, strict=True) if not m] or list(updates)
    keys = reference[0].keys()
    for u in updates:
        if u.keys() != keys:
            raise ValueError(
                f"{name}.corrupt: updates have different key sets, e.g. only in one: "
                f"{sorted(set(keys) ^ set(u.keys()))[:5]}; expected the same keys in every update"
            )
    return {
        k: fn(torch.stack([r[k].double() for r in reference]))
        for k, v in reference[0].items()
        if v.dtype.is_floating_point
    }


def _fill(update: Params, target: dict[str, Tensor]) -> dict[str, Tensor]:
    """``target`` cast to ``update``'s dtypes and devices; its integer tensors passed through."""
    return {
        k: target[k].to(dtype=v.dtype, device=v.device) if v.dtype.is_floating_point else v
        for k, v in update.items()
    }


class _ModelAttack:
    """Model attacks train honestly: ``poison`` returns the data unchanged."""

    def poison(
        self, data: TensorData, *, num_classes: int, generator: torch.Generator
    ) -> TensorData:
        return data


@dataclass(frozen=True)
class SignFlip(_ModelAttack):
    """Sign flipping: a malicious client sends ``-scale`` times its own update.

    Li et al. 2019, *RSA: Byzantine-Robust Stochastic Aggregation* (arXiv 1811.03761).

    >>> import torch
    >>> SignFlip(2.0).corrupt([{"w": torch.tensor([1.0, -0.5])}], [True], generator=torch.Generator())
    [{'w': tensor([-2.,  1.])}]
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_number("SignFlip", "scale", self.scale, low=0.0, strict=True, hint="e.g. 1.0")

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        return _replace(
            "SignFlip", updates, malicious, lambda u: _map_floating(u, lambda v: -self.scale * v)
        )


@dataclass(frozen=True)
class Scale(_ModelAttack):
    """Boosting (model replacement): a malicious client sends ``factor`` times its own update.

    Bagdasaryan et al. 2018, *How To Backdoor Federated Learning* (arXiv 1807.00459).

    >>> import torch
    >>> Scale(10.0).corrupt([{"w": torch.tensor([0.5])}], [True], generator=torch.Generator())
    [{'w': tensor([5.])}]
    """

    factor: float = 10.0

    def __post_init__(self) -> None:
        hint = "e.g. the number of clients per round, to replace the global model"
        _check_number("Scale", "factor", self.factor, low=0.0, strict=True, hint=hint)

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        return _replace(
            "Scale", updates, malicious, lambda u: _map_floating(u, lambda v: self.factor * v)
        )


@dataclass(frozen=True)
class GaussianAttack(_ModelAttack):
    """Gaussian attack: a malicious update is replaced by i.i.d. ``N(0, sigma²)`` noise.

    Noise is drawn (in float64, on CPU) from ``generator``, malicious clients in order and keys in
    update order, so the same generator state gives the same noise. Blanchard et al. 2017
    (arXiv 1703.02757); Fang et al. 2020 (arXiv 1911.11815).

    >>> import torch
    >>> def attack(seed):
    ...     gen = torch.Generator().manual_seed(seed)
    ...     return GaussianAttack(1.0).corrupt([{"w": torch.ones(3)}], [True], generator=gen)[0]["w"]
    >>> torch.equal(attack(0), attack(0)), attack(0).shape
    (True, torch.Size([3]))
    """

    sigma: float = 1.0

    def __post_init__(self) -> None:
        _check_number("GaussianAttack", "sigma", self.sigma, low=0.0, strict=False, hint="e.g. 1.0")

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        def noise(v: Tensor) -> Tensor:
            draw = torch.randn(v.shape, generator=generator, dtype=torch.float64)
            return (self.sigma * draw).to(v.device)

        return _replace("GaussianAttack", updates, malicious, lambda u: _map_floating(u, noise))


@dataclass(frozen=True)
class LabelFlip:
    """Label flipping: a malicious client trains on labels ``num_classes - 1 - y``.

    A data attack; ``corrupt`` leaves the updates as they are. Fang et al. 2020
    (arXiv 1911.11815); Tolpegin et al. 2020 (arXiv 2007.08432).

    >>> import torch
    >>> data = TensorData(torch.zeros(3, 1), torch.tensor([0, 1, 9]))
    >>> LabelFlip().poison(data, num_classes=10, generator=torch.Generator()).y
    tensor([9, 8, 0])
    """

    def poison(
        self, data: TensorData, *, num_classes: int, generator: torch.Generator
    ) -> TensorData:
        y = data.y
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"LabelFlip.poison: labels span [{int(y.min())}, {int(y.max())}]; expected "
                f"integer labels in [0, {num_classes - 1}] for num_classes={num_classes}"
            )
        return TensorData(data.x, (num_classes - 1 - y).to(y.dtype))

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        return _replace("LabelFlip", updates, malicious, _as_dict)


@dataclass(frozen=True)
class ALIE(_ModelAttack):
    """A Little Is Enough: every malicious client sends ``mu - z * sigma``.

    ``mu`` and ``sigma`` are the coordinate-wise mean and population standard deviation
    (``correction=0``, so one honest update suffices) of the round's *honest* updates: the
    attacker is omniscient. If every update is malicious, all updates are used. With the
    population deviation, any ``z <= 1 / sqrt(h - 1)`` for ``h`` honest updates keeps every
    coordinate within the honest range. ``z=None`` uses the paper's ``z_max`` (see
    :meth:`z_max`). Baruch et al. 2019 (arXiv 1902.06156).

    >>> import torch
    >>> honest = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}]
    >>> ALIE(z=1.0).corrupt([*honest, {"w": torch.tensor([9.0])}], [False, False, True],
    ...                     generator=torch.Generator())[2]
    {'w': tensor([0.])}
    """

    z: float | None = None

    def __post_init__(self) -> None:
        if self.z is not None:
            hint = "or None for the paper's z_max"
            _check_number("ALIE", "z", self.z, low=0.0, strict=False, hint=hint)

    @staticmethod
    def z_max(num_updates: int, num_malicious: int) -> float:
        """The paper's ``z = Φ⁻¹((n - s) / n)`` with ``s = floor(n/2 + 1) - f`` supporters needed.

        When the malicious clients hold a majority (``s <= 0``) the formula is infinite; ``s`` is
        then taken as 1 (the largest finite value of the formula). ``z`` is never negative.

        >>> round(ALIE.z_max(20, 4), 4)
        0.3853
        """
        n, f = num_updates, num_malicious
        if n < 1 or not 0 <= f <= n:
            raise ValueError(
                f"ALIE.z_max: got num_updates={n}, num_malicious={f}; "
                "expected 1 <= num_updates and 0 <= num_malicious <= num_updates"
            )
        s = max(math.floor(n / 2 + 1) - f, 1)
        return statistics.NormalDist().inv_cdf(max((n - s) / n, 0.5))

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        f = sum(bool(m) for m in malicious)
        if f == 0 or len(updates) != len(malicious):
            return _replace("ALIE", updates, malicious, _as_dict)
        z = self.z if self.z is not None else self.z_max(len(updates), f)

        def shift(s: Tensor) -> Tensor:
            std, mean = torch.std_mean(s, dim=0, correction=0)
            return mean - z * std

        target = _statistic("ALIE", updates, malicious, shift)
        return _replace("ALIE", updates, malicious, lambda u: _fill(u, target))


@dataclass(frozen=True)
class IPM(_ModelAttack):
    """Inner-product manipulation: every malicious client sends ``-epsilon`` × the honest mean.

    Omniscient, as :class:`ALIE`; if every update is malicious, all updates are used.
    Xie et al. 2019, *Fall of Empires* (arXiv 1903.03936).

    >>> import torch
    >>> ups = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([0.0])}]
    >>> IPM(0.5).corrupt(ups, [False, False, True], generator=torch.Generator())[2]
    {'w': tensor([-1.])}
    """

    epsilon: float = 0.5

    def __post_init__(self) -> None:
        hint = "small (0.1) evades robust aggregators, large (100) overwhelms the mean"
        _check_number("IPM", "epsilon", self.epsilon, low=0.0, strict=True, hint=hint)

    def corrupt(
        self, updates: Sequence[Params], malicious: Sequence[bool], *, generator: torch.Generator
    ) -> list[dict[str, Tensor]]:
        if not any(malicious) or len(updates) != len(malicious):
            return _replace("IPM", updates, malicious, _as_dict)
        target = _statistic("IPM", updates, malicious, lambda s: -self.epsilon * s.mean(dim=0))
        return _replace("IPM", updates, malicious, lambda u: _fill(u, target))
