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
from fedtransfer.client.update import SETUP_CODEC, ClientResult, ClientTask, client_update
from fedtransfer.codecs import Payload
from fedtransfer.data.federated import FederatedDataset
from fedtransfer.errors import FedTransferError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.runtime.serial import Runtime
from fedtransfer.server.validate import validate_update
from fedtransfer.state import ServerState
from fedtransfer.types import Metrics

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
) -> tuple[ServerState, RoundReport]:
    """Run round ``state.round + 1`` and return the new state and its report.

    Only updates that decode and validate are aggregated; a round with none leaves the global
    parameters and server state unchanged.
    """
    began = time.perf_counter()
    r = state.round + 1
    plan = recipe.plan(model_fn())
    cohort = recipe.sampler.sample(population.clients, seed=state.seed, round=r)
    downlink = recipe.downlink.encode(state.params).to_bytes()
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
            data=population.train[c],
            local=state.clients.get(c) or start_local,
            frozen=frozen,
            start_sha256=state.start_sha256,
            setup=setup if c in new_clients else None,
        )
        for c in cohort
    ]
    results = runtime.map(partial(client_update, recipe=recipe, model_fn=model_fn), tasks)

    updates, weights, accepted, rejected = [], [], [], []
    clients = dict(state.clients)
    for res in results:
        try:
            updates.append(_decode_valid(recipe, res, state.params, r))
        except UpdateRejected as exc:
            log.warning("rejected update: %s", exc)
            rejected.append((res.client, str(exc)))
            continue
        weights.append(float(res.num_examples))
        accepted.append(res.client)
        clients[res.client] = res.local

    kept = set(accepted)
    params, server = state.params, state.server
    metrics = _client_metrics([res for res in results if res.client in kept])
    if updates:
        out = recipe.pipeline.apply(updates, weights, params=state.params, state=state.server)
        params, server = tree.add(state.params, out.value), out.state
        metrics.update({f"server/{k}": v for k, v in out.metrics.items()})

    bytes_up = sum(len(res.uplink) for res in results)
    bytes_down = len(downlink) * len(cohort)
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
        clients=clients,
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


def _decode_valid(
    recipe: Recipe, res: ClientResult, reference: dict[str, Tensor], r: int
) -> dict[str, Tensor]:
    try:
        update = recipe.uplink.decode(Payload.from_bytes(res.uplink))
    except (FedTransferError, RuntimeError, TypeError, ValueError, OverflowError) as exc:
        # whatever a client sends, a bad payload is that client's rejection, not the round's end
        raise UpdateRejected(
            f"client {res.client}, round {r}: payload does not decode: {exc}",
            client=res.client,
            round=r,
        ) from None
    validate_update(update, res.num_examples, reference=reference, client=res.client, round=r)
    return update


def _client_metrics(results: list[ClientResult]) -> Metrics:
    losses = [res.metrics["loss"] for res in results if res.metrics.get("steps")]
    steps = [res.metrics.get("steps", 0.0) for res in results]
    return {
        "client/train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "client/steps": float(sum(steps)),
    }
