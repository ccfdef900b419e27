"""``ServerPipeline``: per-client steps (``ClipNorm``, HetLoRA's rank pad) ▸ aggregator ▸ the
objective's server half ▸ post (server optimiser).

The server half of a client objective (SCAFFOLD's control variate, FedDyn's correction …) is
a step of this pipeline like any other, seen through :class:`ServerHalf`: the server knows
nothing of how clients train (``server/`` imports nothing from ``client/``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.optimizers import ServerSGD
from fedtransfer.types import Metrics, Out, Params, State, UpdateContext, UpdateTransform


class ServerHalf(Protocol):
    """The server half of a recipe's objective: a step between the aggregator and the post
    steps that sees the round's accepted updates, their extras and weights, and keeps its
    state under ``objective/`` (``Objective`` in :mod:`fedtransfer.client.objectives` is one)."""

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
        """The adjusted step and the new state; ``params`` is the current global θ."""


def _sub(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _put(into: State, prefix: str, part: State) -> None:
    into.update({prefix + k: v for k, v in part.items()})


def _through(
    steps: Sequence[UpdateTransform],
    name: str,
    value: dict[str, Tensor],
    ctx: UpdateContext,
    state: State,
    new_state: State,
    metrics: Metrics,
) -> dict[str, Tensor]:
    """``value`` through ``steps`` in order, step ``i`` reading its state from ``state`` under
    ``<name>/<i>/`` and writing it, and its metrics, into ``new_state`` and ``metrics``."""
    for i, t in enumerate(steps):
        out = t.apply(value, _sub(state, f"{name}/{i}/"), ctx)
        value = out.value
        _put(new_state, f"{name}/{i}/", out.state)
        metrics.update({f"{name}/{i}/{k}": v for k, v in out.metrics.items()})
    return value


@dataclass(frozen=True)
class ServerPipeline:
    """Everything the server does with the updates of a round, in two parts.

    :meth:`admit` runs the per-client steps on one client's decoded update (HetLoRA's rank
    pad, ``ClipNorm``), before it is validated: the round keeps the state it returns only for
    an update it accepts. :meth:`apply` takes the accepted updates through the aggregator, the
    objective's server half and the post steps, and returns the *step* to add to the global
    shared parameters. State is one flat mapping, namespaced ``per_client/<i>/``,
    ``aggregator/``, ``objective/`` (the server half of the recipe's client objective, e.g.
    SCAFFOLD's control variate) and ``post/<i>/``; every step is an
    :class:`~fedtransfer.types.UpdateTransform`.

    >>> import torch
    >>> pipe = ServerPipeline()
    >>> params = {"w": torch.zeros(1)}
    >>> pipe.apply([{"w": torch.ones(1)}], [1.0], params=params, state=pipe.init(params)).value
    {'w': tensor([1.])}
    """

    per_client: tuple[UpdateTransform, ...] = ()
    aggregator: Aggregator = field(default_factory=Mean)
    post: tuple[UpdateTransform, ...] = field(default_factory=lambda: (ServerSGD(),))

    def init(self, params: Params) -> State:
        state: State = {}
        for i, t in enumerate(self.per_client):
            _put(state, f"per_client/{i}/", t.init(params))
        _put(state, "aggregator/", self.aggregator.init(params))
        for i, t in enumerate(self.post):
            _put(state, f"post/{i}/", t.init(params))
        return state

    def admit(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        """One client's update (``ctx.client``) through the per-client steps, with the whole
        pipeline state in and out (only the ``per_client/`` parts change); metrics are named
        ``per_client/<i>/<name>``."""
        if not self.per_client:
            return Out(dict(update), state)
        new_state: State = dict(state)
        metrics: Metrics = {}
        value = _through(
            self.per_client, "per_client", dict(update), ctx, state, new_state, metrics
        )
        return Out(value, new_state, metrics)

    def apply(
        self,
        updates: Sequence[Params],
        weights: Sequence[float],
        *,
        params: Params,
        state: State,
        objective: ServerHalf | None = None,
        extras: Sequence[State] = (),
        population_size: int = 0,
    ) -> Out[dict[str, Tensor]]:
        """The step for ``updates`` (already admitted and validated); ``extras`` are the
        clients' objective extras in the same order, ``population_size`` the number of
        clients in the federation. The ``per_client/`` state passes through unchanged."""
        new_state: State = {k: v for k, v in state.items() if k.startswith("per_client/")}
        metrics: Metrics = {}
        agg = self.aggregator.aggregate(updates, weights, _sub(state, "aggregator/"))
        _put(new_state, "aggregator/", agg.state)
        metrics.update({f"aggregator/{k}": v for k, v in agg.metrics.items()})
        # an aggregator may widen dtypes (robust ones work in float64): the step is the model's
        step: dict[str, Tensor] = {
            k: v.to(params[k].dtype) if k in params and v.dtype != params[k].dtype else v
            for k, v in agg.value.items()
        }
        if objective is not None:
            adjusted = objective.server_apply(
                step,
                updates=updates,
                extras=extras,
                weights=weights,
                state=_sub(state, "objective/"),
                population_size=population_size,
                params=params,
            )
            step = adjusted.value
            _put(new_state, "objective/", adjusted.state)
            metrics.update({f"objective/{k}": v for k, v in adjusted.metrics.items()})
        step = _through(self.post, "post", step, UpdateContext(params), state, new_state, metrics)
        return Out(step, new_state, metrics)
