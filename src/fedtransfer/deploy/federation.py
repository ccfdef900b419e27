"""A federation across processes, without the transport: the server's round and the client's
side of it, as plain functions of bytes and stored tensors.

The server composes the simulator's own steps (:func:`~fedtransfer.staged.begin_round`, the
sampler, :func:`~fedtransfer.round.outbound`, :func:`~fedtransfer.round.receive`,
:func:`~fedtransfer.round.apply_updates`, :func:`~fedtransfer.round.conclude`); a client runs
the simulator's own :func:`~fedtransfer.client.update.client_update`. Only the hand-off
differs: a :class:`Request` goes out, a :class:`Reply` comes back, and whatever carries them
(:mod:`fedtransfer.deploy.flower`, or a plain function call in tests) is the transport. The
client, not the server, keeps its starting weights, local keys and objective memory
(:class:`Holdings`), so nothing private leaves it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.update import (
    SETUP_CODEC,
    ClientResult,
    ClientTask,
    client_update,
    load_weights,
    verify_start,
    worker_model,
)
from fedtransfer.codecs import Payload
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import CompatibilityError, FedTransferError
from fedtransfer.recipe import Recipe
from fedtransfer.round import (
    Outbound,
    RoundReport,
    apply_updates,
    conclude,
    outbound,
    receive,
)
from fedtransfer.staged import begin_round
from fedtransfer.state import ServerState
from fedtransfer.transfer.schedule import stage_recipe
from fedtransfer.types import Metrics


@dataclass(frozen=True, eq=False)
class Request:
    """What the server sends one client for one round: the round's wire bytes (see
    :class:`~fedtransfer.round.Outbound`) and the numbers that seed its work."""

    client: str
    round: int
    seed: int
    stage: int
    start_sha256: str
    downlink: bytes
    broadcast: bytes | None = None
    setup: bytes | None = None
    handover: bytes | None = None

    @property
    def nbytes(self) -> int:
        """Payload bytes (what the ledger counts for this client)."""
        return sum(
            len(b or b"") for b in (self.downlink, self.broadcast, self.setup, self.handover)
        )


@dataclass(frozen=True, eq=False)
class Reply:
    """What a client sends back: its encoded update and extras, its weight, its metrics, or
    the ``error`` that kept it from sending an update."""

    client: str
    uplink: bytes
    num_examples: int
    extras: bytes = b""
    metrics: Metrics = field(default_factory=dict)
    error: str = ""

    def result(self) -> ClientResult:
        """As the simulator's :class:`~fedtransfer.client.update.ClientResult` (the client's
        local keys and memory stay on the client)."""
        return ClientResult(
            client=self.client,
            uplink=self.uplink,
            num_examples=self.num_examples,
            metrics=dict(self.metrics),
            extras=self.extras,
            error=self.error,
        )


Send = Callable[[Sequence[Request]], Mapping[str, Reply]]
"""The transport: deliver requests, return the replies that came back, by client (a client
that does not answer is missing from the mapping)."""


def open_round(
    recipe: Recipe,
    state: ServerState,
    clients: Sequence[str],
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[Recipe, ServerState, Outbound, list[Request]]:
    """Begin round ``state.round + 1`` as the simulator does (stage, cohort, what is sent):
    the round's recipe and state, the outbound bytes, and one request per cohort client."""
    r = state.round + 1
    recipe, state = begin_round(recipe, state, model_fn=model_fn)
    cohort = recipe.sampler.sample(list(clients), seed=state.seed, round=r)
    out = outbound(recipe, state, cohort, model_fn=model_fn)
    requests = [
        Request(
            client=c,
            round=r,
            seed=state.seed,
            stage=state.stage,
            start_sha256=state.start_sha256,
            downlink=out.downlink,
            broadcast=out.broadcast,
            setup=out.setup if c in out.new_clients else None,
            handover=out.handovers[c][1] if c in out.handovers else None,
        )
        for c in cohort
    ]
    return recipe, state, out, requests


def server_round(
    recipe: Recipe,
    state: ServerState,
    clients: Sequence[str],
    send: Send,
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[ServerState, RoundReport]:
    """Round ``state.round + 1`` over a transport: the simulator's sampling, encoding,
    validation and aggregation around ``send``. A client that does not answer is rejected
    for the round, like one whose update does not decode."""
    began = time.perf_counter()
    recipe, state, out, requests = open_round(recipe, state, clients, model_fn=model_fn)
    cohort, r = [q.client for q in requests], state.round + 1
    replies = send(requests)
    results = [
        replies[c].result()
        if c in replies
        else ClientResult(c, b"", 0, error="no reply (the client failed or timed out)")
        for c in cohort
    ]
    kept, rejected = receive(recipe, state, results, r, plan=out.plan)
    applied = apply_updates(recipe, state, len(clients), kept)
    applied[2]["schedule/stage"] = float(state.stage)
    sent = out.dispatched(recipe, state, cohort, results)
    # unlike a simulated one, a client that never answered may not hold the starting weights:
    # it is sent them again next time
    silent = set(out.new_clients) - set(replies)
    sent = replace(sent, set_up=tuple(c for c in sent.set_up if c not in silent))
    return conclude(state, sent, results, kept, rejected, applied, cohort=cohort, began=began)


def resumed(state: ServerState) -> ServerState:
    """A checkpointed server state, continued in a new deployment: the clients' holdings lived
    in the previous run's nodes, so every client is set up again (its starting weights sent
    and verified anew); local keys and objective memory restart from the starting weights."""
    return state.replace(set_up=(), synced={}, clients={}, memory={})


@dataclass(frozen=True, eq=False)
class Holdings:
    """What a client keeps between rounds: the starting weights it verified (updated by stage
    hand-overs), its local keys, its objective and transform memory, and its stage."""

    start: dict[str, Tensor] = field(default_factory=dict)
    local: dict[str, Tensor] = field(default_factory=dict)
    memory: dict[str, Tensor] = field(default_factory=dict)
    stage: int = 0


def client_round(
    request: Request,
    holdings: Holdings,
    data: TensorData,
    recipe: Recipe,
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[Reply, Holdings]:
    """One client's round on its private ``data``: :func:`client_update`, with the weights it
    holds. Returns the reply and what it keeps. A request for another stage than the one
    this client's recipe is in is refused (the two sides run different configurations)."""
    current, stage = stage_recipe(recipe, request.round)
    if stage != request.stage:
        raise CompatibilityError(
            f"client {request.client}, round {request.round}: the server is in stage "
            f"{request.stage} but this client's configuration is in stage {stage}; hint: run "
            "server and clients from the same configuration file"
        )
    holdings = _entered(holdings, current, stage, model_fn)
    start = holdings.start
    if request.setup is not None:
        start = verify_start(request.setup, request.start_sha256, client=request.client)
    elif not start:
        raise CompatibilityError(
            f"client {request.client}, round {request.round}: no starting weights; the server "
            "did not send the set-up to a client it has not set up (was the client restarted?)"
        )
    if request.handover is not None:
        start = {**start, **SETUP_CODEC.decode(Payload.from_bytes(request.handover))}
    _, plan = worker_model(current.policy, model_fn)
    task = ClientTask(
        client=request.client,
        round=request.round,
        seed=request.seed,
        downlink=request.downlink,
        data=data,
        local={**tree.select(start, plan.local), **holdings.local},
        frozen=tree.select(start, plan.frozen),
        start_sha256=request.start_sha256,
        memory=holdings.memory,
        broadcast=request.broadcast,
    )
    res = client_update(task, recipe=current, model_fn=model_fn)
    reply = Reply(res.client, res.uplink, res.num_examples, res.extras, res.metrics, res.error)
    if res.error:
        return reply, Holdings(start, holdings.local, holdings.memory, stage)
    return reply, Holdings(start, res.local, res.memory, stage)


def client_evaluate(
    request: Request,
    holdings: Holdings,
    data: TensorData,
    recipe: Recipe,
    *,
    model_fn: Callable[[], nn.Module],
) -> dict[str, float]:
    """The global model of ``request.round`` (its shared keys in ``request.downlink``) with
    this client's frozen and local keys, evaluated on its test ``data``; a client never set up
    verifies the ``request.setup`` it is sent first."""
    current, _ = stage_recipe(recipe, request.round)
    start = holdings.start
    if request.setup is not None:
        start = verify_start(request.setup, request.start_sha256, client=request.client)
    if not start:
        raise FedTransferError(f"client {request.client}: evaluate before any starting weights")
    model, plan = worker_model(current.policy, model_fn)
    shared = current.downlink.decode(Payload.from_bytes(request.downlink))
    weights = {
        **tree.select(start, plan.frozen),
        **tree.select(start, plan.local),
        **holdings.local,
        **shared,
    }
    load_weights(model, weights)
    return evaluate(model, data)


def _entered(
    holdings: Holdings, recipe: Recipe, stage: int, model_fn: Callable[[], nn.Module]
) -> Holdings:
    """A client's holdings in ``stage``: as the simulator's ``enter_stage`` does for it, local
    keys that are no longer local are dropped and memory restarts."""
    if stage == holdings.stage:
        return holdings
    _, plan = worker_model(recipe.policy, model_fn)
    local = {k: v for k, v in holdings.local.items() if k in set(plan.local)}
    return Holdings(holdings.start, local, {}, stage)
