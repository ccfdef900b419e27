"""The end of a round: the accepted updates through the server pipeline, the next state
(global parameters, what the clients that answered keep, the ledger) and the round's report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.client.objectives import scale_floats
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.collect import Collected
from fedtransfer.rounds.distribute import Outbound
from fedtransfer.rounds.messages import Reply
from fedtransfer.state import ClientHoldings, InFlight, ServerState
from fedtransfer.state.clientstore import merged
from fedtransfer.types import Metrics, Params, State

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
) -> tuple[Collected, Step]:
    """The accepted updates (already through the per-client steps, in :func:`collect`) through
    the rest of the recipe's pipeline; ``scales`` multiply each of them first (FedBuff's
    staleness weights). With none accepted, the global parameters and server state are
    unchanged.

    A global model that would not be finite (finite updates can overflow: one client's
    ``3e38`` in a float32 mean) is never committed: the clients with the largest values in
    the keys that overflowed are rejected, naming why, and the rest aggregated again (none,
    if that overflows too). A round with fewer than ``recipe.limits.min_responses`` accepted
    updates changes nothing either, and says so. Returns what was accepted in the end, and
    the step."""
    r = state.round + 1
    need = recipe.limits.min_responses
    if 0 < len(got.accepted) < need:
        log.warning(
            "round %d: %d accepted, fewer than min_responses = %d", r, len(got.accepted), need
        )
        few = f"only {len(got.accepted)} accepted updates, fewer than min_responses = {need}"
        got = _without(got, _clients(got), lambda c: f"client {c}, round {r}: {few}", state)
        step = _step(recipe, state, got, population_size, None)
        step.metrics["server/too_few_responses"] = 1.0
        return got, step
    step = _step(recipe, state, got, population_size, scales)
    bad = _non_finite(step.params)
    if not bad:
        return got, step
    drop = _offenders(got, bad)
    log.warning("round %d: the aggregate of %s is not finite; rejecting %s", r, bad[:3], drop)

    def why(client: str) -> str:
        return (
            f"client {client}, round {r}: the global model would not be finite ({bad[:3]} "
            "overflow) with this update, among the largest in those keys"
        )

    for attempt in (drop, _clients(got)):
        kept = _without(got, attempt, why, state)
        kept_scales = None
        if scales is not None:
            kept_scales = [
                s
                for a, s in zip(got.accepted, scales, strict=True)
                if a.reply.client not in attempt
            ]
        step = _step(recipe, state, kept, population_size, kept_scales)
        if not _non_finite(step.params):
            step.metrics["server/rolled_back"] = float(len(got.accepted) - len(kept.accepted))
            return kept, step
    raise AssertionError("unreachable: a round with no accepted update changes nothing")


def _step(
    recipe: Recipe,
    state: ServerState,
    got: Collected,
    population_size: int,
    scales: Sequence[float] | None,
) -> Step:
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


def _non_finite(params: Params) -> list[str]:
    """The floating keys of ``params`` that hold a NaN or an inf."""
    return [
        k
        for k, v in params.items()
        if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())
    ]


def _without(
    got: Collected, clients: set[str], why: Callable[[str], str], state: ServerState
) -> Collected:
    """``got`` with ``clients``' accepted updates rejected for ``why(client)``; the per-client
    steps' state goes back to the round's start (a rolled-back round keeps none)."""
    return Collected(
        got.replies,
        tuple(a for a in got.accepted if a.reply.client not in clients),
        got.rejected + tuple((c, why(c)) for c in sorted(clients & _clients(got))),
        state.server,
    )


def _clients(got: Collected) -> set[str]:
    return {a.reply.client for a in got.accepted}


def _offenders(got: Collected, keys: Sequence[str]) -> set[str]:
    """The accepted clients whose largest magnitude in ``keys`` is within a factor 1000 of the
    largest any client sent there: the ones that can make a weighted mean overflow."""
    tops = {
        a.reply.client: max(
            float(a.update[k].double().abs().max()) for k in keys if a.update[k].numel()
        )
        for a in got.accepted
    }
    top = max(tops.values())
    return {c for c, t in tops.items() if t >= top / 1000}


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
