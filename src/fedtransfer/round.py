"""``run_round``: the spine of federated transfer learning, readable in one go.

sample ▸ broadcast ▸ client work ▸ validate ▸ aggregate ▸ server step ▸ report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.attacks import Threat
from fedtransfer.client.update import SETUP_CODEC, ClientResult, ClientTask, client_update
from fedtransfer.codecs import Payload
from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.errors import FedTransferError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.runtime.serial import Runtime
from fedtransfer.seeding import generator
from fedtransfer.server.validate import validate_update
from fedtransfer.state import ServerState
from fedtransfer.types import Metrics, State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundReport:
    """What one round did: cohort, accepted and rejected clients, bytes and seconds."""

    round: int
    cohort: tuple[str, ...]
    accepted: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]
    bytes_up: int
    bytes_down: int
    setup_bytes: int
    seconds: float
    metrics: Metrics = field(default_factory=dict)


def run_round(
    recipe: Recipe,
    state: ServerState,
    population: FederatedDataset,
    runtime: Runtime,
    *,
    model_fn: Callable[[], nn.Module],
    threat: Threat | None = None,
) -> tuple[ServerState, RoundReport]:
    """Run round ``state.round + 1`` and return the new state and its report.

    Only updates that decode and validate are aggregated; a round with none leaves the global
    parameters and server state unchanged. ``threat`` simulates malicious clients (robustness
    evaluation): they train on poisoned data and their updates are replaced before validation.
    """
    began = time.perf_counter()
    r = state.round + 1
    plan = recipe.plan(model_fn())
    cohort = recipe.sampler.sample(population.clients, seed=state.seed, round=r)
    malicious = threat.malicious(population.clients, seed=state.seed) if threat else frozenset()
    downlink = recipe.downlink.encode(state.params).to_bytes()
    told = recipe.objective.broadcast(_part(state.server, "objective/"))
    broadcast = recipe.downlink.encode(told).to_bytes() if told else None
    set_up = set(state.set_up)
    new_clients = [c for c in cohort if c not in set_up]
    setup = SETUP_CODEC.encode(state.start).to_bytes() if new_clients else None
    frozen = tree.select(state.start, plan.frozen)
    # a client with no stored local keys (new, or only ever rejected) starts them from the start
    start_local = tree.select(state.start, plan.local)
    tasks = [
        ClientTask(
            client=c,
            round=r,
            seed=state.seed,
            downlink=downlink,
            data=_data_for(c, population, threat, malicious, state.seed, r),
            local=state.clients.get(c) or start_local,
            frozen=frozen,
            start_sha256=state.start_sha256,
            setup=setup if c in new_clients else None,
            memory=state.memory.get(c, {}),
            broadcast=broadcast,
        )
        for c in cohort
    ]
    results = runtime.map(partial(client_update, recipe=recipe, model_fn=model_fn), tasks)
    received, rejected = _receive(recipe, results, r)
    if threat is not None and received:
        replaced = threat.attack.corrupt(
            [u for _, u, _ in received],
            [res.client in malicious for res, _, _ in received],
            generator=generator(state.seed, "attack", r),
        )
        received = [(res, u, e) for (res, _, e), u in zip(received, replaced, strict=True)]
    extras_ref = recipe.objective.extras_like(state.params, plan)
    kept: list[tuple[ClientResult, dict[str, Tensor], State]] = []
    for res, update, extras in received:
        try:
            validate_update(
                update, res.num_examples, reference=state.params, client=res.client, round=r
            )
            validate_update(extras, 1, reference=extras_ref, client=res.client, round=r)
        except UpdateRejected as exc:
            log.warning("rejected update: %s", exc)
            rejected.append((res.client, str(exc)))
            continue
        kept.append((res, update, extras))

    accepted = [res.client for res, _, _ in kept]
    params, server = state.params, state.server
    metrics = _client_metrics([res for res, _, _ in kept])
    metrics["attack/malicious"] = float(sum(c in malicious for c in cohort))
    if kept:
        out = recipe.pipeline.apply(
            [u for _, u, _ in kept],
            [float(res.num_examples) for res, _, _ in kept],
            params=state.params,
            state=state.server,
            objective=recipe.objective,
            extras=[e for _, _, e in kept],
            population_size=len(population.clients),
        )
        params, server = tree.add(state.params, out.value), out.state
        metrics.update({f"server/{k}": v for k, v in out.metrics.items()})

    bytes_up = sum(len(res.uplink) + len(res.extras) for res in results)
    bytes_down = (len(downlink) + len(broadcast or b"")) * len(cohort)
    setup_bytes = len(setup) * len(new_clients) if setup else 0
    ledger = {
        "setup": state.ledger["setup"] + setup_bytes,
        "up": state.ledger["up"] + bytes_up,
        "down": state.ledger["down"] + bytes_down,
    }
    new_state = state.replace(
        round=r,
        params=params,
        server=server,
        clients={**state.clients, **{res.client: res.local for res, _, _ in kept}},
        memory={**state.memory, **{res.client: res.memory for res, _, _ in kept if res.memory}},
        set_up=tuple(sorted(set_up | set(new_clients))),
        ledger=ledger,
    )
    report = RoundReport(
        round=r,
        cohort=tuple(cohort),
        accepted=tuple(accepted),
        rejected=tuple(rejected),
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        setup_bytes=setup_bytes,
        seconds=time.perf_counter() - began,
        metrics=metrics,
    )
    return new_state, report


def _part(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _data_for(
    client: str,
    population: FederatedDataset,
    threat: Threat | None,
    malicious: frozenset[str],
    seed: int,
    r: int,
) -> TensorData:
    data = population.train[client]
    if threat is None or client not in malicious:
        return data
    gen = generator(seed, "poison", r, client)
    return threat.attack.poison(data, num_classes=population.num_classes, generator=gen)


def _receive(
    recipe: Recipe, results: list[ClientResult], r: int
) -> tuple[list[tuple[ClientResult, dict[str, Tensor], State]], list[tuple[str, str]]]:
    """Decode every result's update and extras; a payload that does not decode is a rejection."""
    received, rejected = [], []
    for res in results:
        try:
            update = recipe.uplink.decode(Payload.from_bytes(res.uplink))
            extras = recipe.uplink.decode(Payload.from_bytes(res.extras)) if res.extras else {}
        except (FedTransferError, RuntimeError, TypeError, ValueError, OverflowError) as exc:
            # whatever a client sends, a bad payload is that client's rejection, not the round's end
            why = f"client {res.client}, round {r}: payload does not decode: {exc}"
            log.warning("rejected update: %s", why)
            rejected.append((res.client, why))
            continue
        received.append((res, update, extras))
    return received, rejected


def _client_metrics(results: list[ClientResult]) -> Metrics:
    losses = [res.metrics["loss"] for res in results if res.metrics.get("steps")]
    steps = [res.metrics.get("steps", 0.0) for res in results]
    return {
        "client/train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "client/steps": float(sum(steps)),
    }
