"""Asynchronous buffered aggregation (FedBuff) in simulated time, on the same client and
server code as :func:`fedtransfer.run_round`.

FedBuff (Nguyen et al., arXiv 2106.06639): ``concurrency`` clients train at once, each from the
global version current when it was dispatched; they finish after simulated delays; whenever
``buffer_size`` updates have arrived the server aggregates them, each scaled by its staleness
weight ``s(τ) = (1 + τ)^(−exponent)`` (τ = versions published since it was dispatched), and
publishes a new version. One call of :func:`run_buffered_step` is one server update, so a
"round" of an asynchronous run is one version.

Client results are computed at dispatch (they depend only on the version they start from) and
held, with their arrival time, in ``ServerState.pending``, so a checkpoint between steps loses
nothing and a resumed run is bit-identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtransfer.data.federated import FederatedDataset
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.recipe import Recipe
from fedtransfer.robustness.threat import Threat
from fedtransfer.rounds.collect import answered, collect
from fedtransfer.rounds.distribute import distribute
from fedtransfer.rounds.finalize import RoundReport, aggregate, finalize
from fedtransfer.rounds.messages import Send
from fedtransfer.rounds.participation import ClientDelays
from fedtransfer.rounds.schedule import Schedule, as_schedule
from fedtransfer.rounds.simulate import InProcess
from fedtransfer.runtime.serial import Runtime
from fedtransfer.seeding import generator
from fedtransfer.state import InFlight, Pending, ServerState


@dataclass(frozen=True)
class FedBuff:
    """FedBuff settings: ``buffer_size`` K updates per server step, ``concurrency`` clients
    training at once, staleness weights ``(1 + τ)^(−staleness_exponent)`` (0.5 in the paper).

    >>> FedBuff(buffer_size=3, concurrency=6).staleness_weight(3)
    0.5
    """

    buffer_size: int = 5
    concurrency: int = 10
    staleness_exponent: float = 0.5
    delays: ClientDelays = field(default_factory=ClientDelays)

    def __post_init__(self) -> None:
        for name in ("buffer_size", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FedBuff: {name} must be an integer >= 1, got {value!r}")
        if self.buffer_size > self.concurrency:
            raise ConfigError(
                f"FedBuff: buffer_size {self.buffer_size} > concurrency {self.concurrency}; the "
                "server would wait for more updates than are ever in flight; hint: raise "
                "concurrency or lower buffer_size"
            )
        if not 0 <= self.staleness_exponent < math.inf:
            raise ConfigError(
                f"FedBuff: staleness_exponent must be finite and >= 0, got {self.staleness_exponent}"
            )

    def staleness_weight(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.staleness_exponent)


def run_buffered_step(
    recipe: Recipe | Schedule,
    state: ServerState,
    population: FederatedDataset,
    runtime: Runtime,
    *,
    model_fn: Callable[[], nn.Module],
    fedbuff: FedBuff,
    threat: Threat | None = None,
) -> tuple[ServerState, RoundReport]:
    """Dispatch idle clients up to ``concurrency``, then aggregate the next ``buffer_size``
    arrivals into version ``state.round + 1``. The recipe's sampler is not used: idle clients
    are drawn uniformly, seeded by the run seed and the version."""
    began = time.perf_counter()
    schedule = as_schedule(recipe)
    if schedule.staged:
        raise CompatibilityError(
            f"FedBuff: a schedule of {len(schedule.stages)} stages is not supported "
            "asynchronously, because updates in flight would belong to the previous stage; "
            "hint: run the staged arm synchronously (drop fedbuff)"
        )
    recipe = schedule.recipe_at(1)
    if fedbuff.concurrency > len(population.clients):
        raise ConfigError(
            f"FedBuff: concurrency {fedbuff.concurrency} exceeds the population of "
            f"{len(population.clients)} clients; hint: lower concurrency"
        )
    r = state.round + 1
    busy = {p.result.client for p in state.inflight.pending}
    idle = [c for c in population.clients if c not in busy]
    order = torch.randperm(len(idle), generator=generator(state.seed, "dispatch", r)).tolist()
    chosen = [idle[i] for i in order[: fedbuff.concurrency - len(busy)]]
    out = distribute(recipe, state, chosen, model_fn=model_fn)
    clients = InProcess(recipe, state, population.train.__getitem__, runtime, model_fn)
    send: Send = clients
    malicious = threat.malicious(population.clients, seed=state.seed) if threat else frozenset()
    if threat is not None:
        send = threat.around(clients, recipe, state, population=population, malicious=malicious)
    replies = send(out.requests)
    pending = list(state.inflight.pending) + [
        Pending(
            res,
            version=state.round,
            arrival=state.inflight.clock
            + fedbuff.delays.duration(res.client, seed=state.seed, job=r),
        )
        for res in answered(chosen, replies)
    ]
    pending.sort(key=lambda p: (p.arrival, p.result.client))
    arrived, still = pending[: fedbuff.buffer_size], pending[fedbuff.buffer_size :]
    got = collect(
        recipe,
        state,
        [p.result for p in arrived],
        plan=out.plan,
        example_counts=clients.example_count,
    )
    staleness = {p.result.client: state.round - p.version for p in arrived}
    scales = [fedbuff.staleness_weight(staleness[a.reply.client]) for a in got.accepted]
    got, step = aggregate(
        recipe, state, got, population_size=len(population.clients), scales=scales
    )
    step.metrics["async/staleness_mean"] = sum(staleness.values()) / max(len(staleness), 1)
    step.metrics["async/staleness_max"] = float(max(staleness.values(), default=0))
    step.metrics["attack/malicious"] = float(sum(p.result.client in malicious for p in arrived))
    return finalize(
        state,
        out,
        got,
        step,
        set_up=out.set_up(state, answered=replies.keys()),
        synced={},
        began=began,
        inflight=InFlight(tuple(still), arrived[-1].arrival),
    )
