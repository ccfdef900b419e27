"""Client objectives: what a client optimises locally, and the server half that goes with it.

An :class:`Objective` wraps the one training loop (:func:`local_train`) with add-ons —
a proximal term (FedProx), gradient correction by control variates (SCAFFOLD), a dynamic
regulariser (FedDyn), normalised updates (FedNova) — and owns the state they need: per-client
*memory* (kept by the client across rounds), a server state, a *broadcast* the server sends
with the global parameters and *extras* each client sends back with its update. Both travel
through the recipe's codecs and are counted in the byte ledger.

Here: the protocol, ``Plain`` (FedAvg) and ``Prox`` (FedProx); drift control (SCAFFOLD, FedDyn,
FedNova) is in :mod:`.drift`, personalisation (Ditto, FedRep) in :mod:`.personalization`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fedtransfer.client.fast.features import train_head_cached
from fedtransfer.client.train import LocalTraining, local_train
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.server.pipeline import ServerHalf
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Metrics, Out, Params, State


@dataclass(frozen=True, eq=False)
class ClientContext:
    """What an objective sees on a client in one round.

    ``global_shared`` is θ as decoded from the downlink; ``memory`` is what this client kept
    from its previous participation (empty the first time); ``broadcast`` is the objective's
    share of the server state for this round.
    """

    global_shared: Params
    memory: State
    broadcast: State
    spec: LocalTraining
    generator: torch.Generator
    start_sha256: str = ""
    """Hash of the starting weights the client's frozen keys come from (it identifies the
    frozen trunk for feature caching); empty when unknown."""


@dataclass(frozen=True, eq=False)
class ClientOut:
    """What an objective's training returns besides the trained model.

    ``update_scale`` multiplies the floating part of the update before encoding (FedNova's
    normalisation); ``extras`` go to the server; ``memory`` replaces the client's memory.
    """

    metrics: Metrics
    memory: State = field(default_factory=dict)
    extras: State = field(default_factory=dict)
    update_scale: float = 1.0


@runtime_checkable
class Objective(ServerHalf, Protocol):
    """A client's local objective with its server half (state is data, never attributes):
    ``server_apply`` (:class:`~fedtransfer.server.pipeline.ServerHalf`) adjusts the aggregated
    step before the server optimiser."""

    def check(self, plan: ParamPlan) -> None:
        """Raise if this objective cannot work with ``plan`` (called by ``Recipe.validate``)."""

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        """Train ``model`` (loaded with the round's weights) in place."""

    def server_init(self, params: Params, plan: ParamPlan) -> State:
        """Initial server state for global shared parameters ``params``."""

    def extras_like(self, params: Params, plan: ParamPlan) -> State:
        """Zeros shaped like the extras a client sends (the server validates against them)."""

    def broadcast(self, state: State) -> State:
        """The part of the server state sent to the cohort with θ (often nothing)."""

    def personal(self, weights: Params, memory: State) -> dict[str, Tensor]:
        """The weights a client evaluates as its personal model (default: ``weights``)."""


def trainable_shared(plan: ParamPlan) -> tuple[str, ...]:
    """Shared keys that are parameters: where proximal terms and control variates apply."""
    return tuple(k for k in plan.shared if k in plan.trainable)


def scale_floats(a: Params, factor: float) -> dict[str, Tensor]:
    """``factor * a`` on floating tensors; integer tensors (step counters) unchanged."""
    return {k: v * factor if v.dtype.is_floating_point else v for k, v in a.items()}


def effective_steps(steps: float, spec: LocalTraining) -> float:
    """FedNova's ``a_i``: how many plain-SGD steps ``steps`` momentum-SGD steps amount to.

    ``a = [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` (Wang et al. 2020, arXiv 2007.07481, §4);
    ``a = τ`` for plain SGD and, as an approximation, for Adam.
    """
    rho = spec.momentum if spec.optimizer == "sgd" else 0.0
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


Penalty = Callable[[dict[str, nn.Parameter]], Tensor]


def _proximal(anchor: Params, keys: Sequence[str], mu: float) -> Penalty:
    """``mu/2 · Σ_k ||w_k − anchor_k||²``."""

    def penalty(params: dict[str, nn.Parameter]) -> Tensor:
        total = torch.zeros(())
        for k in keys:
            total = total + (params[k] - anchor[k]).pow(2).sum()
        return 0.5 * mu * total

    return penalty


class _Base:
    """Defaults for the server half: no state, no broadcast, the step unchanged."""

    def check(self, plan: ParamPlan) -> None:
        return None

    def server_init(self, params: Params, plan: ParamPlan) -> State:
        return {}

    def extras_like(self, params: Params, plan: ParamPlan) -> State:
        return {}

    def broadcast(self, state: State) -> State:
        return {}

    def server_apply(
        self,
        step: dict[str, Tensor],
        *,
        updates: Sequence[Params],
        extras: Sequence[State],
        weights: Sequence[float],
        state: State,
        population_size: int,
        params: Params,
    ) -> Out[dict[str, Tensor]]:
        return Out(step, state)

    def personal(self, weights: Params, memory: State) -> dict[str, Tensor]:
        return dict(weights)


@dataclass(frozen=True)
class Plain(_Base):
    """Empirical risk on the client's data: the local objective of FedAvg.

    >>> Plain().broadcast({})
    {}
    """

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        # only the head trains (linear probing): train it on cached frozen-trunk features
        cached = train_head_cached(
            model, plan, data, ctx.spec, generator=ctx.generator, trunk=ctx.start_sha256
        )
        if cached is not None:
            return ClientOut(cached)
        return ClientOut(local_train(model, plan, data, ctx.spec, generator=ctx.generator))


@dataclass(frozen=True)
class Prox(_Base):
    """FedProx (Li et al., arXiv 1812.06127): adds ``mu/2 · ||w − θ||²`` over shared parameters.

    Unlike Flower's FedProx strategy, the term is part of the client's objective here, so a
    recipe is complete without client code. ``mu = 0`` is FedAvg.

    >>> Prox(mu=0.01).mu
    0.01
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        _check_nonneg("Prox", "mu", self.mu)

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        anchor = {k: v.detach() for k, v in ctx.global_shared.items()}
        penalty = _proximal(anchor, trainable_shared(plan), self.mu) if self.mu else None
        metrics = local_train(model, plan, data, ctx.spec, generator=ctx.generator, penalty=penalty)
        return ClientOut(metrics)


def _check_nonneg(owner: str, name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < float("inf")
    ):
        raise ConfigError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
