"""Server optimisers as update transforms: the aggregated update Δ is a negative pseudo-gradient.

``ServerSGD`` gives FedAvg (lr 1, no momentum) and FedAvgM (Hsu et al., arXiv 1909.06335);
``ServerAdam`` / ``ServerYogi`` / ``ServerAdagrad`` are FedAdam / FedYogi / FedAdagrad of
Reddi et al. 2021 (arXiv 2003.00295, Algorithm 2). Only floating tensors are optimised;
integer buffers (BatchNorm's ``num_batches_tracked``) pass through as the mean update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from fedtransfer.errors import ConfigError
from fedtransfer.types import Out, Params, State


@runtime_checkable
class UpdateTransform(Protocol):
    """A one-to-one step on an update: ``init(params) -> state``, ``apply(update, state, params)``."""

    def init(self, params: Params) -> State:
        """Initial state for shared parameters ``params``."""

    def apply(self, update: Params, state: State, params: Params) -> Out[dict[str, Tensor]]:
        """The transformed update and the new state."""


def _floats(params: Params) -> list[str]:
    return [k for k, v in params.items() if v.dtype.is_floating_point]


@dataclass(frozen=True)
class ServerSGD:
    """θ ← θ + lr · v with v ← momentum · v + Δ. ``ServerSGD()`` is plain FedAvg.

    >>> import torch
    >>> ServerSGD(lr=0.5).apply({"w": torch.tensor([2.0])}, {}, {"w": torch.zeros(1)}).value
    {'w': tensor([1.])}
    """

    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"ServerSGD: lr must be finite and > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"ServerSGD: momentum must be in [0, 1), got {self.momentum}")

    def init(self, params: Params) -> State:
        if not self.momentum:
            return {}
        return {f"v/{k}": torch.zeros_like(params[k]) for k in _floats(params)}

    def apply(self, update: Params, state: State, params: Params) -> Out[dict[str, Tensor]]:
        out: dict[str, Tensor] = dict(update)
        new_state: State = {}
        for k in _floats(update):
            if self.momentum:
                v = self.momentum * state[f"v/{k}"] + update[k]
                new_state[f"v/{k}"] = v
                out[k] = self.lr * v
            else:
                out[k] = self.lr * update[k]
        return Out(out, new_state)


@dataclass(frozen=True)
class _Adaptive:
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    initial_accumulator: float = 0.0
    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "adam"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not (0 < self.lr < math.inf and 0 < self.tau < math.inf):
            raise ConfigError(f"{name}: lr and tau must be > 0, got lr={self.lr}, tau={self.tau}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"{name}: betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 <= self.initial_accumulator < math.inf:
            raise ConfigError(
                f"{name}: initial_accumulator must be >= 0, got {self.initial_accumulator}"
            )

    def init(self, params: Params) -> State:
        state: State = {}
        for k in _floats(params):
            state[f"m/{k}"] = torch.zeros_like(params[k])
            state[f"v/{k}"] = torch.full_like(params[k], self.initial_accumulator)
        return state

    def apply(self, update: Params, state: State, params: Params) -> Out[dict[str, Tensor]]:
        out: dict[str, Tensor] = dict(update)
        new_state: State = {}
        for k in _floats(update):
            d = update[k]
            m = self.beta1 * state[f"m/{k}"] + (1.0 - self.beta1) * d
            v_prev, d2 = state[f"v/{k}"], d * d
            if self.rule == "adam":
                v = self.beta2 * v_prev + (1.0 - self.beta2) * d2
            elif self.rule == "yogi":
                v = v_prev - (1.0 - self.beta2) * d2 * torch.sign(v_prev - d2)
            else:
                v = v_prev + d2
            new_state[f"m/{k}"], new_state[f"v/{k}"] = m, v
            out[k] = self.lr * m / (torch.sqrt(v) + self.tau)
        return Out(out, new_state)


@dataclass(frozen=True)
class ServerAdam(_Adaptive):
    """FedAdam: m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; step = lr · m / (√v + τ)."""

    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "adam"


@dataclass(frozen=True)
class ServerYogi(_Adaptive):
    """FedYogi: v ← v − (1−β₂) Δ² sign(v − Δ²); otherwise as FedAdam."""

    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "yogi"


@dataclass(frozen=True)
class ServerAdagrad(_Adaptive):
    """FedAdagrad: v ← v + Δ²; otherwise as FedAdam (β₂ unused)."""

    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "adagrad"
