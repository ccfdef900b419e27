"""The end of a round: the accepted updates through the server pipeline, the next state
(global parameters, what the clients that answered keep, the ledger) and the round's report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from fedtransfer import tree
from fedtransfer.client.objectives import scale_floats
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.collect import Collected
from fedtransfer.rounds.distribute import Outbound
from fedtransfer.rounds.messages import Reply
from fedtransfer.state import ClientHoldings, InFlight, ServerState
from fedtransfer.state.clientstore import merged
from fedtransfer.types import Metrics, State


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


@dataclass(frozen=True, eq=False)
class Step:
    """The server pipeline's result for a round: the new global shared parameters, the new
    server state, and the round's metrics (the clients' and the pipeline's)."""

    params: dict[str, Tensor]
    server: State
    metrics: Metrics


def aggregate(
    recipe: Recipe,
    state: ServerState,
    got: Collected,
    *,
    population_size: int,
    scales: Sequence[float] | None = None,
) -> Step:
    """The accepted updates (already through the per-client steps, in :func:`collect`) through
    the rest of the recipe's pipeline; ``scales`` multiply each of them first (FedBuff's
    staleness weights). With none accepted, the global parameters and server state are
    unchanged."""
    metrics = _client_metrics([a.reply for a in got.accepted])
    if not got.accepted:
        return Step(state.params, state.server, metrics)
    metrics.update({f"server/{k}": v for k, v in got.metrics.items()})
    updates = [a.update for a in got.accepted]
    if scales is not None:
        updates = [scale_floats(u, s) for u, s in zip(updates, scales, strict=True)]
    out = recipe.pipeline.apply(
        updates,
        [float(a.reply.num_examples) for a in got.accepted],
        params=state.params,
        state=got.server,
        objective=recipe.objective,
        extras=[a.extras for a in got.accepted],
        population_size=population_size,
    )
    metrics.update({f"server/{k}": v for k, v in out.metrics.items()})
    return Step(tree.add(state.params, out.value), out.state, metrics)


def finalize(
    state: ServerState,
    out: Outbound,
    got: Collected,
    step: Step,
    *,
    set_up: tuple[str, ...],
    synced: dict[str, int],
    began: float,
    inflight: InFlight | None = None,
) -> tuple[ServerState, RoundReport]:
    """The next state and its report: the ``step``'s parameters, what the accepted clients
    keep (through :func:`~fedtransfer.state.clientstore.merged`: a dict is copied, a
    :class:`~fedtransfer.state.clientstore.ClientStore` writes only theirs), the clients ``set_up``
    and ``synced`` after the round, the ledger (``got`` went up, ``out`` went down), and, for
    asynchronous runs, the updates still in flight and the simulated clock (``inflight``)."""
    kept = [a.reply for a in got.accepted]
    new_state = state.replace(
        round=state.round + 1,
        params=step.params,
        server=step.server,
        holdings=ClientHoldings(
            merged(state.holdings.local, {rep.client: rep.local for rep in kept}),
            merged(state.holdings.memory, {rep.client: rep.memory for rep in kept if rep.memory}),
        ),
        distribution=replace(state.distribution, set_up=set_up, synced=synced),
        ledger={
            "setup": state.ledger["setup"] + out.setup_bytes,
            "up": state.ledger["up"] + got.bytes_up,
            "down": state.ledger["down"] + out.bytes_down,
        },
        inflight=state.inflight if inflight is None else inflight,
    )
    report = RoundReport(
        round=new_state.round,
        cohort=tuple(c for rep in got.replies for c in rep.senders),
        accepted=tuple(rep.client for rep in kept),
        rejected=got.rejected,
        bytes_up=got.bytes_up,
        bytes_down=out.bytes_down,
        setup_bytes=out.setup_bytes,
        seconds=time.perf_counter() - began,
        metrics=step.metrics,
    )
    return new_state, report


def _client_metrics(replies: list[Reply]) -> Metrics:
    losses = [rep.metrics["loss"] for rep in replies if rep.metrics.get("steps")]
    steps = [rep.metrics.get("steps", 0.0) for rep in replies]
    return {
        "client/train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "client/steps": float(sum(steps)),
    }
