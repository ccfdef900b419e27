"""``run_round``: the spine of federated transfer learning, readable in one go.

sample ▸ broadcast ▸ client work ▸ validate ▸ aggregate ▸ server step ▸ report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.attacks import Threat
from fedtransfer.client.objectives import scale_floats
from fedtransfer.client.update import SETUP_CODEC, ClientResult, ClientTask, ClientUpdate
from fedtransfer.clientstore import merged
from fedtransfer.codecs import Payload
from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.errors import FedTransferError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.runtime.serial import Runtime
from fedtransfer.seeding import generator
from fedtransfer.server.validate import validate_update
from fedtransfer.staged import begin_round, handover_keys
from fedtransfer.state import Pending, ServerState
from fedtransfer.transfer.policy import ParamPlan, per_client_rank
from fedtransfer.transfer.schedule import StagePolicy
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
    recipe, state = begin_round(recipe, state, model_fn=model_fn)
    cohort = recipe.sampler.sample(population.clients, seed=state.seed, round=r)
    sent = dispatch(recipe, state, population, runtime, cohort, model_fn=model_fn, threat=threat)
    kept, rejected = receive(
        recipe, state, sent.results, r, plan=sent.plan, threat=threat, malicious=sent.malicious
    )
    applied = apply_updates(recipe, state, len(population.clients), kept)
    applied[2]["attack/malicious"] = float(sum(c in sent.malicious for c in cohort))
    applied[2]["schedule/stage"] = float(state.stage)
    return conclude(state, sent, sent.results, kept, rejected, applied, cohort=cohort, began=began)


def conclude(
    state: ServerState,
    sent: Dispatched,
    results: Sequence[ClientResult],
    kept: Received,
    rejected: list[tuple[str, str]],
    applied: tuple[dict[str, Tensor], State, Metrics],
    *,
    cohort: Sequence[str],
    began: float,
    pending: tuple[Pending, ...] | None = None,
    clock: float | None = None,
) -> tuple[ServerState, RoundReport]:
    """The next state and its report: what the clients that were heard from keep, the ledger
    (``results`` sent up, ``sent`` went down), and, for asynchronous runs, the updates still in
    flight and the simulated clock. Clients' states are updated through
    :func:`~fedtransfer.clientstore.merged`: a dict is copied, a :class:`ClientStore` writes
    only the cohort's files."""
    params, server, metrics = applied
    bytes_up = sum(len(res.uplink) + len(res.extras) for res in results)
    new_state = state.replace(
        round=state.round + 1,
        params=params,
        server=server,
        clients=merged(state.clients, {res.client: res.local for res, _, _ in kept}),
        memory=merged(state.memory, {res.client: res.memory for res, _, _ in kept if res.memory}),
        set_up=sent.set_up,
        synced=sent.synced,
        ledger={
            "setup": state.ledger["setup"] + sent.setup_bytes,
            "up": state.ledger["up"] + bytes_up,
            "down": state.ledger["down"] + sent.bytes_down,
        },
        pending=state.pending if pending is None else pending,
        clock=state.clock if clock is None else clock,
    )
    report = RoundReport(
        round=new_state.round,
        cohort=tuple(cohort),
        accepted=tuple(res.client for res, _, _ in kept),
        rejected=tuple(rejected),
        bytes_up=bytes_up,
        bytes_down=sent.bytes_down,
        setup_bytes=sent.setup_bytes,
        seconds=time.perf_counter() - began,
        metrics=metrics,
    )
    return new_state, report


@dataclass(frozen=True, eq=False)
class Dispatched:
    """Client results for one broadcast of the current global model, and what it cost."""

    results: list[ClientResult]
    plan: ParamPlan
    bytes_down: int
    setup_bytes: int
    set_up: tuple[str, ...]
    malicious: frozenset[str]
    synced: dict[str, int]


@dataclass(frozen=True, eq=False)
class Outbound:
    """What the server sends a round's clients, as bytes on the wire: the encoded global shared
    keys and objective broadcast (to every client), the starting weights (to clients new to
    the run) and stage hand-overs (to clients behind a stage). The simulator hands these to
    client tasks; a deployment sends them in messages."""

    plan: ParamPlan
    downlink: bytes
    broadcast: bytes | None
    setup: bytes | None
    new_clients: tuple[str, ...]
    handovers: dict[str, tuple[tuple[str, ...], bytes]]
    """client → (the keys it lacks, their encoded values)."""

    def dispatched(
        self,
        recipe: Recipe,
        state: ServerState,
        clients: Sequence[str],
        results: list[ClientResult],
        *,
        malicious: frozenset[str] = frozenset(),
    ) -> Dispatched:
        """The round's :class:`Dispatched` record: ``results`` and what sending this cost."""
        return Dispatched(
            results=results,
            plan=self.plan,
            bytes_down=(len(self.downlink) + len(self.broadcast or b"")) * len(clients)
            + sum(len(h) for _, h in self.handovers.values()),
            setup_bytes=len(self.setup) * len(self.new_clients) if self.setup else 0,
            set_up=tuple(sorted(set(state.set_up) | set(self.new_clients))),
            malicious=malicious,
            synced={**state.synced, **dict.fromkeys(clients, state.stage)}
            if isinstance(recipe.policy, StagePolicy)
            else {},
        )


def outbound(
    recipe: Recipe,
    state: ServerState,
    clients: Sequence[str],
    *,
    model_fn: Callable[[], nn.Module],
) -> Outbound:
    """Encode what the server sends ``clients`` this round (see :class:`Outbound`)."""
    plan = recipe.plan(model_fn())
    downlink = recipe.downlink.encode(state.params).to_bytes()
    told = recipe.objective.broadcast(_part(state.server, "objective/"))
    broadcast = recipe.downlink.encode(told).to_bytes() if told else None
    set_up = set(state.set_up)
    new_clients = tuple(c for c in clients if c not in set_up)
    setup = SETUP_CODEC.encode(state.start).to_bytes() if new_clients else None
    lacking = handover_keys(recipe, state, clients, list(new_clients), model_fn=model_fn)
    handovers = {
        c: (tuple(k), SETUP_CODEC.encode(tree.select(state.start, k)).to_bytes())
        for c, k in lacking.items()
    }
    return Outbound(plan, downlink, broadcast, setup, new_clients, handovers)


def dispatch(
    recipe: Recipe,
    state: ServerState,
    population: FederatedDataset,
    runtime: Runtime,
    clients: Sequence[str],
    *,
    model_fn: Callable[[], nn.Module],
    threat: Threat | None = None,
) -> Dispatched:
    """Broadcast the current global model to ``clients`` and run their updates."""
    r = state.round + 1
    out = outbound(recipe, state, clients, model_fn=model_fn)
    malicious = threat.malicious(population.clients, seed=state.seed) if threat else frozenset()
    tasks = [
        ClientTask(
            client=c,
            round=r,
            seed=state.seed,
            downlink=out.downlink,
            data=_data_for(c, population, threat, malicious, state.seed, r),
            **_holdings(state, out.plan, c, out.handovers.get(c, ((), b""))[0]),
            start_sha256=state.start_sha256,
            setup=out.setup if c in out.new_clients else None,
            memory=state.memory.get(c, {}),
            broadcast=out.broadcast,
            handover=out.handovers[c][1] if c in out.handovers else None,
        )
        for c in clients
    ]
    results = runtime.map(ClientUpdate(recipe, model_fn), tasks)
    return out.dispatched(recipe, state, clients, results, malicious=malicious)


Received = list[tuple[ClientResult, dict[str, Tensor], State]]


def receive(
    recipe: Recipe,
    state: ServerState,
    results: Sequence[ClientResult],
    r: int,
    *,
    plan: ParamPlan,
    threat: Threat | None = None,
    malicious: frozenset[str] = frozenset(),
) -> tuple[Received, list[tuple[str, str]]]:
    """Decode, (attack,) and validate results: the accepted ones and the rejections.

    ``malicious`` is the threat's malicious set (:attr:`Dispatched.malicious`)."""
    received, rejected = _decode(recipe, results, r)
    if threat is not None and received:
        replaced = threat.attack.corrupt(
            [u for _, u, _ in received],
            [res.client in malicious for res, _, _ in received],
            generator=generator(state.seed, "attack", r),
        )
        received = [(res, u, e) for (res, _, e), u in zip(received, replaced, strict=True)]
    extras_ref = recipe.objective.extras_like(state.params, plan)
    kept: Received = []
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
    return kept, rejected


def apply_updates(
    recipe: Recipe,
    state: ServerState,
    population_size: int,
    kept: Received,
    *,
    scales: Sequence[float] | None = None,
) -> tuple[dict[str, Tensor], State, Metrics]:
    """The new global parameters and server state from the accepted updates (``scales``
    multiply each update first: FedBuff's staleness weights)."""
    metrics = _client_metrics([res for res, _, _ in kept])
    if not kept:
        return state.params, state.server, metrics
    updates = [u for _, u, _ in kept]
    if scales is not None:
        updates = [scale_floats(u, s) for u, s in zip(updates, scales, strict=True)]
    out = recipe.pipeline.apply(
        updates,
        [float(res.num_examples) for res, _, _ in kept],
        params=state.params,
        state=state.server,
        objective=recipe.objective,
        extras=[e for _, _, e in kept],
        population_size=population_size,
    )
    metrics.update({f"server/{k}": v for k, v in out.metrics.items()})
    return tree.add(state.params, out.value), out.state, metrics


def _part(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _holdings(
    state: ServerState, plan: ParamPlan, client: str, lacks: Sequence[str]
) -> dict[str, dict[str, Tensor]]:
    """The frozen and local keys ``client`` holds (in simulation the server hands them over).

    Local keys it has not stored (new, only ever rejected, new in this stage) start from the
    starting weights; a client behind a stage lacks its hand-over keys until it decodes them."""
    missing = set(lacks)
    local = set(plan.local)
    held = {k: v for k, v in state.clients.get(client, {}).items() if k in local}
    return {
        "frozen": {k: state.start[k] for k in plan.frozen if k not in missing},
        "local": {**{k: state.start[k] for k in plan.local if k not in missing}, **held},
    }


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


def _decode(
    recipe: Recipe, results: Sequence[ClientResult], r: int
) -> tuple[Received, list[tuple[str, str]]]:
    """Decode every result's update and extras; a payload that does not decode is a rejection."""
    received: Received = []
    rejected: list[tuple[str, str]] = []
    per_client = per_client_rank(recipe.policy)
    for res in results:
        if res.error:
            rejected.append((res.client, f"client {res.client}, round {r}: {res.error}"))
            continue
        try:
            update = recipe.uplink.decode(Payload.from_bytes(res.uplink))
            if per_client is not None:  # heterogeneous ranks: back to global shapes
                update = per_client.pad(update, res.client)
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
