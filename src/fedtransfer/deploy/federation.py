"""A federation across processes, without the transport: the server's round and the client's
side of it, as plain functions of bytes and stored tensors.

The server runs the simulator's own round (:func:`~fedtransfer.rounds.spine.server_round`);
a client runs the simulator's own :func:`~fedtransfer.client.update.client_update`. Only the
hand-off differs: a :class:`~fedtransfer.rounds.messages.Request` goes out, a
:class:`~fedtransfer.rounds.messages.Reply` comes back, and whatever carries them
(:mod:`fedtransfer.deploy.flower`, or a plain function call in tests) is the transport. The
client, not the server, keeps its starting weights, local keys and objective memory
(:class:`Holdings`), so nothing private leaves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.update import (
    SETUP_CODEC,
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
from fedtransfer.rounds.finalize import RoundReport
from fedtransfer.rounds.messages import NEEDS_SETUP, Reply, Request, Send
from fedtransfer.rounds.schedule import Schedule, as_schedule
from fedtransfer.rounds.spine import open_round, server_round
from fedtransfer.state import ClientHoldings, ServerState


def deployed_round(
    recipe: Recipe | Schedule,
    state: ServerState,
    clients: Sequence[str],
    send: Send,
    *,
    model_fn: Callable[[], nn.Module],
    example_counts: Callable[[str], float | None] | None = None,
) -> tuple[ServerState, RoundReport]:
    """Round ``state.round + 1`` of ``recipe`` among ``clients`` over a transport: the
    simulator's :func:`~fedtransfer.rounds.spine.open_round` (stage, cohort) and
    :func:`~fedtransfer.rounds.spine.server_round` around ``send`` (``example_counts``: what
    each client reported when it connected, the bound of the weight it may claim)."""
    _, state, cohort = open_round(recipe, state, clients, model_fn=model_fn)
    return server_round(
        recipe,
        state,
        cohort,
        send,
        model_fn=model_fn,
        population_size=len(clients),
        example_counts=example_counts,
    )


def resumed(state: ServerState) -> ServerState:
    """A checkpointed server state, continued in a new deployment: the clients' holdings lived
    in the previous run's nodes, so every client is set up again (its starting weights sent
    and verified anew); local keys and objective memory restart from the starting weights."""
    return state.replace(
        distribution=replace(state.distribution, set_up=(), synced={}), holdings=ClientHoldings()
    )


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
    recipe: Recipe | Schedule,
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[Reply, Holdings]:
    """One client's round on its private ``data``: :func:`client_update`, with the weights it
    holds. Returns the reply and what it keeps. A request for another stage than the one
    this client's recipe is in is refused (the two sides run different configurations)."""
    schedule = as_schedule(recipe)
    stage, model_fn = schedule.index_at(request.round), schedule.prepared(model_fn)
    current = schedule.stages[stage][1]
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
    elif not start:  # restarted: ask the server to set this client up again
        why = f"holds no starting weights (restarted?); round {request.round} is skipped"
        return Reply(request.client, b"", 0, error=NEEDS_SETUP + why), holdings
    if request.handover is not None:
        start = {**start, **SETUP_CODEC.decode(Payload.from_bytes(request.handover))}
    _, plan = worker_model(current.policy, model_fn)
    held = plan.held(start, holdings.local)
    task = ClientTask(
        client=request.client,
        round=request.round,
        seed=request.seed,
        downlink=request.downlink,
        data=data,
        local=held[1],
        frozen=held[0],
        start_sha256=request.start_sha256,
        memory=holdings.memory,
        broadcast=request.broadcast,
    )
    res = client_update(task, recipe=current, model_fn=model_fn)
    reply = replace(res, local={}, memory={})  # what the client keeps stays here
    if res.error:
        return reply, Holdings(start, holdings.local, holdings.memory, stage)
    return reply, Holdings(start, res.local, res.memory, stage)


def client_evaluate(
    request: Request,
    holdings: Holdings,
    data: TensorData,
    recipe: Recipe | Schedule,
    *,
    model_fn: Callable[[], nn.Module],
) -> dict[str, float]:
    """The global model of ``request.round`` (its shared keys in ``request.downlink``) with
    this client's frozen and local keys, evaluated on its test ``data``; a client never set up
    verifies the ``request.setup`` it is sent first."""
    schedule = as_schedule(recipe)
    current, model_fn = schedule.recipe_at(request.round), schedule.prepared(model_fn)
    start = holdings.start
    if request.setup is not None:
        start = verify_start(request.setup, request.start_sha256, client=request.client)
    if not start:
        raise FedTransferError(f"client {request.client}: evaluate before any starting weights")
    model, plan = worker_model(current.policy, model_fn)
    shared = current.downlink.decode(Payload.from_bytes(request.downlink))
    frozen, local = plan.held(start, holdings.local)
    weights = {**frozen, **local, **shared}
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
