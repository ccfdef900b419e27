"""The no-federation arms: every client alone (local-only) and pooled data (centralised)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.fast.features import train_head_cached
from fedtransfer.client.train import local_train
from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.recipe import Recipe
from fedtransfer.seeding import generator
from fedtransfer.state import ServerState
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Metrics

POOLED = "<pooled>"
"""The ``ServerState.clients`` entry holding a centralised model's local keys."""


def weights_of(mode: str, state: ServerState, client: str) -> dict[str, Tensor]:
    """The model ``client`` is evaluated with in an arm of ``mode``."""
    if mode == "centralised":
        return {**state.weights_for(), **state.holdings.local.get(POOLED, {})}
    return state.weights_for(client)


@dataclass(frozen=True)
class IsolatedRound:
    """What a round of a no-federation arm did: local training only, nothing sent."""

    round: int
    seconds: float
    metrics: Metrics = field(default_factory=dict)


def train_isolated(
    mode: str,
    recipe: Recipe,
    state: ServerState,
    population: FederatedDataset,
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[ServerState, IsolatedRound]:
    """One round of a ``local-only`` or ``centralised`` arm: ``recipe.training`` training of what
    the recipe's policy trains, with nothing sent anywhere (the ledger does not move).

    Local-only: each client continues its own model on its own training split (its trained keys
    live in ``state.holdings.local``). Centralised: one model on all training splits pooled.
    """
    began = time.perf_counter()
    r = state.round + 1
    model = recipe.policy.prepare(model_fn())
    plan = recipe.policy.plan(model)
    kept = (*plan.shared, *plan.local)
    losses: list[float] = []
    if mode == "centralised":
        pooled = _pooled(population)
        model.load_state_dict(weights_of(mode, state, POOLED), strict=True)
        metrics = _train(model, plan, pooled, recipe, generator(state.seed, "pooled", r))
        losses.append(metrics["loss"])
        trained = model.state_dict()
        params = tree.clone(tree.select(trained, plan.shared))
        clients = {POOLED: tree.clone(tree.select(trained, plan.local))}
    else:
        params, clients = state.params, dict(state.holdings.local)
        for c in population.clients:
            model.load_state_dict(state.weights_for(c), strict=True)
            gen = generator(state.seed, "local-only", r, c)
            metrics = _train(model, plan, population.train[c], recipe, gen)
            if metrics["steps"]:
                losses.append(metrics["loss"])
            clients[c] = tree.clone(tree.select(model.state_dict(), kept))
    new_state = state.replace(
        round=r, params=params, holdings=replace(state.holdings, local=clients)
    )
    loss = sum(losses) / len(losses) if losses else float("nan")
    return new_state, IsolatedRound(r, time.perf_counter() - began, {"client/train_loss": loss})


_POOLED: weakref.WeakKeyDictionary[FederatedDataset, TensorData] = weakref.WeakKeyDictionary()


def _pooled(population: FederatedDataset) -> TensorData:
    """All clients' training data together, built once per population (the same tensors every
    round, so a frozen trunk's features of it are cached)."""
    pooled = _POOLED.get(population)
    if pooled is None:
        pooled = _POOLED[population] = population.pooled_train()
    return pooled


def _train(
    model: nn.Module, plan: ParamPlan, data: TensorData, recipe: Recipe, gen: torch.Generator
) -> Metrics:
    """``local_train``; from the frozen trunk's cached features when only the head trains
    (the same minibatches and results, as in federated rounds)."""
    cached = train_head_cached(model, plan, data, recipe.training, generator=gen)
    if cached is not None:
        return cached
    return local_train(model, plan, data, recipe.training, generator=gen)
