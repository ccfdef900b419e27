"""Server optimisers as update transforms: the aggregated update Δ is a negative pseudo-gradient.

``ServerSGD`` gives FedAvg (lr 1, no momentum) and FedAvgM (Hsu et al., arXiv 1909.06335);
``ServerAdam`` / ``ServerYogi`` / ``ServerAdagrad`` are FedAdam / FedYogi / FedAdagrad of
Reddi et al. 2021 (arXiv 2003.00295, Algorithm 2). Only floating tensors are optimised;
integer buffers (BatchNorm's ``num_batches_tracked``) pass through as the mean update.
``ServerAdam(bias_correction=...)`` optionally adds Adam's bias-corrected step size (Kingma &
Ba, arXiv 1412.6980), textbook or as Flower's ``FedAdam`` computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from fedtransfer.errors import ConfigError
from fedtransfer.types import Out, Params, State, UpdateContext, UpdateTransform

__all__ = ["ServerAdagrad", "ServerAdam", "ServerSGD", "ServerYogi", "UpdateTransform"]


def _floats(params: Params) -> list[str]:
    return [k for k, v in params.items() if v.dtype.is_floating_point]


@dataclass(frozen=True)
class ServerSGD:
    """θ ← θ + lr · v with v ← momentum · v + Δ. ``ServerSGD()`` is plain FedAvg.

    >>> import torch
    >>> from fedtransfer.types import UpdateContext
    >>> step = ServerSGD(lr=0.5).apply({"w": torch.tensor([2.0])}, {}, UpdateContext({}))
    >>> step.value
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

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
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

    def _step_size(self, state: State) -> tuple[float, State]:
        """This step's server learning rate and the state that tracks it (none here)."""
        return self.lr, {}

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        out: dict[str, Tensor] = dict(update)
        lr, new_state = self._step_size(state)
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
            out[k] = lr * m / (torch.sqrt(v) + self.tau)
        return Out(out, new_state)


BiasCorrection = Literal["none", "adam", "flower"]
"""How :class:`ServerAdam` scales its step size with the step count ``t`` (1 on the first step)."""


@dataclass(frozen=True)
class ServerAdam(_Adaptive):
    """FedAdam: m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; step = lr · m / (√v + τ).

    ``bias_correction`` replaces ``lr`` by ``lr · √(1−β₂ᵏ) / (1−β₁ᵏ)`` (Adam's α_t, Kingma & Ba,
    arXiv 1412.6980, with τ added outside the corrected root): ``"none"`` (default, Reddi et al.
    Algorithm 2) never does, ``"adam"`` uses k = t, and ``"flower"`` uses k = t + 1, exactly as
    ``flwr`` 1.42's ``FedAdam`` (it corrects with ``server_round + 1``, rounds counted from 1).
    With a correction the state also holds the step count ``t`` (an int64 scalar).

    >>> import torch
    >>> adam = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-8, bias_correction="adam")
    >>> params = {"w": torch.zeros(1)}
    >>> out = adam.apply({"w": torch.tensor([2.0])}, adam.init(params), params)
    >>> out.value, int(out.state["t"])
    ({'w': tensor([0.1000])}, 1)
    """

    bias_correction: BiasCorrection = "none"
    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "adam"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias_correction not in get_args(BiasCorrection):
            raise ConfigError(
                f"ServerAdam: bias_correction must be one of {list(get_args(BiasCorrection))}, "
                f"got {self.bias_correction!r}; use 'flower' to reproduce flwr's FedAdam, "
                "'adam' for Kingma & Ba's correction"
            )

    def init(self, params: Params) -> State:
        state = super().init(params)
        if self.bias_correction != "none":
            state["t"] = torch.tensor(0, dtype=torch.int64)
        return state

    def _step_size(self, state: State) -> tuple[float, State]:
        if self.bias_correction == "none":
            return self.lr, {}
        t = int(state["t"]) + 1
        k = t + 1 if self.bias_correction == "flower" else t
        lr = self.lr * math.sqrt(1.0 - self.beta2**k) / (1.0 - self.beta1**k)
        return lr, {"t": torch.tensor(t, dtype=torch.int64)}


@dataclass(frozen=True)
class ServerYogi(_Adaptive):
    """FedYogi: v ← v − (1−β₂) Δ² sign(v − Δ²); otherwise as FedAdam."""

    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "yogi"


@dataclass(frozen=True)
class ServerAdagrad(_Adaptive):
    """FedAdagrad: v ← v + Δ²; otherwise as FedAdam (β₂ unused)."""

    rule: ClassVar[Literal["adam", "yogi", "adagrad"]] = "adagrad"
