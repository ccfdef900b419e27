"""The in-process :data:`~fedtransfer.rounds.messages.Send`: the simulated clients, each
request run as :func:`~fedtransfer.client.update.client_update` on a
:class:`~fedtransfer.runtime.serial.Runtime`, with the client's private data and what it holds
(kept, in simulation, in the server state that stands in for the clients' storage)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from fedtransfer import errors
from fedtransfer.client.job import ClientUpdate
from fedtransfer.client.update import ClientTask, worker_model
from fedtransfer.codecs import Payload
from fedtransfer.data.federated import TensorData
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import FAILED, Reply, Request
from fedtransfer.runtime.serial import Runtime
from fedtransfer.state import ServerState
from fedtransfer.transfer.plan import ParamPlan


@dataclass(frozen=True, eq=False)
class InProcess:
    """The clients of a simulated round under ``recipe`` (the round's, its stage's in a
    schedule), holding what ``state`` records for them and training on ``data(client)``."""

    recipe: Recipe
    state: ServerState
    data: Callable[[str], TensorData]
    runtime: Runtime
    model_fn: Callable[[], nn.Module]
    sizes: dict[str, int] = field(default_factory=dict)
    """Each client's number of training examples, recorded as its task is made: what the
    server knows of a simulated client's weight (:meth:`example_count`)."""

    def example_count(self, client: str) -> float | None:
        """The number of examples ``client`` trained on this round, if it was sent a task."""
        n = self.sizes.get(client)
        return None if n is None else float(n)

    def __call__(self, requests: Sequence[Request]) -> dict[str, Reply]:
        _, plan = worker_model(self.recipe.policy, self.model_fn)
        tasks = [self.task(q, plan) for q in requests]
        results = self.runtime.map(ClientUpdate(self.recipe, self.model_fn), tasks)
        failed = [rep for rep in results if rep.error.startswith(FAILED)]
        if failed and len(failed) == len(results):
            raise _every_client_failed(failed, requests[0].round)
        return {rep.client: rep for rep in results}

    def task(self, request: Request, plan: ParamPlan) -> ClientTask:
        """``request`` as the task its simulated client runs."""
        c = request.client
        lacks = _keys(request.handover) if request.handover is not None else ()
        data = self.data(c)
        self.sizes[c] = len(data)
        return ClientTask(
            client=c,
            round=request.round,
            seed=request.seed,
            downlink=request.downlink,
            data=data,
            **holdings(self.state, plan, c, lacks),
            start_sha256=request.start_sha256,
            setup=request.setup,
            memory=self.state.holdings.memory.get(c, {}),
            broadcast=request.broadcast,
            handover=request.handover,
        )


def _every_client_failed(failed: Sequence[Reply], round: int) -> Exception:
    """Every client of the round raised: not a misbehaving client but a broken set-up (a
    replaced checkpoint, a model that does not fit the data) — the first reason, as the
    error it was (a :mod:`fedtransfer.errors` class, or ``RuntimeError``)."""
    first = failed[0]
    reason = first.error[len(FAILED) :]
    name, _, message = reason.partition(": ")
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.FedTransferError)):
        kind, message = RuntimeError, reason
    return kind(
        f"client {first.client}, round {round} failed: {message} (so did every client of "
        f"the round: {len(failed)})"
    )


def holdings(
    state: ServerState, plan: ParamPlan, client: str, lacks: Sequence[str]
) -> dict[str, dict[str, Tensor]]:
    """The frozen and local keys ``client`` holds (in simulation the server hands them over):
    :meth:`~fedtransfer.transfer.plan.ParamPlan.held` of the starting weights and what the
    client stored. A client behind a stage lacks its hand-over keys until it decodes them."""
    stored = state.holdings.local.get(client, {})
    frozen, local = plan.held(state.distribution.start, stored, lacks=lacks)
    return {"frozen": frozen, "local": local}


def _keys(payload: bytes) -> tuple[str, ...]:
    return tuple(e.key for e in Payload.from_bytes(payload).entries)
