"""``server_round``: the one round of federated transfer learning, readable in one go.

distribute ▸ send ▸ collect ▸ aggregate ▸ finalize. The simulator, a Flower deployment and
SecAgg+ differ only in the :data:`~fedtransfer.rounds.messages.Send` they hand it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from fedtransfer.data.federated import FederatedDataset
from fedtransfer.recipe import Recipe
from fedtransfer.robustness.threat import Threat
from fedtransfer.rounds.collect import answered, collect, heard, lost
from fedtransfer.rounds.distribute import distribute
from fedtransfer.rounds.finalize import RoundReport, aggregate, finalize
from fedtransfer.rounds.messages import Send
from fedtransfer.rounds.participation import Participation
from fedtransfer.rounds.schedule import Schedule, as_schedule, begin_round
from fedtransfer.rounds.simulate import InProcess
from fedtransfer.runtime.serial import Runtime
from fedtransfer.state import ServerState


def server_round(
    recipe: Recipe | Schedule,
    state: ServerState,
    cohort: Sequence[str],
    send: Send,
    *,
    model_fn: Callable[[], nn.Module],
    population_size: int,
    example_counts: Callable[[str], float | None] | None = None,
) -> tuple[ServerState, RoundReport]:
    """Round ``state.round + 1`` of ``recipe`` (of the stage it is in, for a schedule; begun
    by :func:`open_round`) with ``cohort`` over ``send``.

    Only updates that decode and validate are aggregated; a client that does not answer is
    rejected like one whose update does not decode, and a round with none accepted leaves the
    global parameters and server state unchanged. ``population_size``: the clients of the
    federation (objectives such as SCAFFOLD scale by it); ``example_counts``: what the server
    knows of a client's example count (a reply may not claim a larger weight)."""
    began = time.perf_counter()
    schedule = as_schedule(recipe)
    current, model_fn = schedule.recipe_at(state.round + 1), schedule.prepared(model_fn)
    lacking = schedule.handover(state, cohort, model_fn=model_fn)
    out = distribute(current, state, cohort, model_fn=model_fn, handover=lacking)
    replies = send(out.requests)
    got = collect(
        current, state, answered(cohort, replies), plan=out.plan, example_counts=example_counts
    )
    got, step = aggregate(current, state, got, population_size=population_size)
    step.metrics["schedule/stage"] = float(state.distribution.stage)
    return finalize(
        state,
        out,
        got,
        step,
        set_up=out.set_up(state, answered=heard(got.replies), lost=lost(got.replies)),
        synced=schedule.synced(state, out.clients),
        began=began,
    )


def open_round(
    recipe: Recipe | Schedule,
    state: ServerState,
    clients: Sequence[str],
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[Recipe, ServerState, list[str]]:
    """The start of round ``state.round + 1``: its recipe (its stage's, in a schedule), the
    state (rebased if the round begins a stage) and the cohort the recipe's sampler draws."""
    schedule = as_schedule(recipe)
    current, state = begin_round(schedule, state, model_fn=schedule.prepared(model_fn))
    cohort = current.sampler.sample(list(clients), seed=state.seed, round=state.round + 1)
    return current, state, cohort


def run_round(
    recipe: Recipe | Schedule,
    state: ServerState,
    population: FederatedDataset,
    runtime: Runtime,
    *,
    model_fn: Callable[[], nn.Module],
    threat: Threat | None = None,
    participation: Participation | None = None,
) -> tuple[ServerState, RoundReport]:
    """Run round ``state.round + 1`` in simulation and return the new state and its report:
    :func:`server_round` over the in-process clients on ``runtime``. ``threat`` simulates
    malicious clients (robustness evaluation) around them
    (:meth:`~fedtransfer.robustness.threat.Threat.around`); ``participation``, clients that
    drop out or answer after the deadline (:mod:`fedtransfer.rounds.participation`)."""
    current, state, cohort = open_round(recipe, state, population.clients, model_fn=model_fn)
    prepared = as_schedule(recipe).prepared(model_fn)
    clients = InProcess(current, state, population.train.__getitem__, runtime, prepared)
    send: Send = clients
    malicious = threat.malicious(population.clients, seed=state.seed) if threat else frozenset()
    if threat is not None:
        send = threat.around(clients, current, state, population=population, malicious=malicious)
    absent: dict[str, str] = {}
    if participation is not None:
        absent = participation.absent(cohort, seed=state.seed, round=state.round + 1)
        send = participation.around(send, seed=state.seed, round=state.round + 1)
    state, report = server_round(
        recipe,
        state,
        cohort,
        send,
        model_fn=model_fn,
        population_size=len(population.clients),
        example_counts=clients.example_count,
    )
    metrics = {**report.metrics, "attack/malicious": float(sum(c in malicious for c in cohort))}
    if participation is not None:
        late = sum(why.startswith("late") for why in absent.values())
        metrics.update(
            {"participation/dropped": float(len(absent) - late), "participation/late": float(late)}
        )
    return state, replace(report, metrics=metrics)
