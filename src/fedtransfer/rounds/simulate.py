"""The in-process :data:`~fedtransfer.rounds.messages.Send`: the simulated clients, each
request run as :func:`~fedtransfer.client.update.client_update` on a
:class:`~fedtransfer.runtime.serial.Runtime`, with the client's private data and what it holds
(kept, in simulation, in the server state that stands in for the clients' storage)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from fedtransfer.client.job import ClientUpdate
from fedtransfer.client.update import ClientTask, worker_model
from fedtransfer.codecs import Payload
from fedtransfer.data.federated import TensorData
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Reply, Request
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

    def __call__(self, requests: Sequence[Request]) -> dict[str, Reply]:
        _, plan = worker_model(self.recipe.policy, self.model_fn)
        tasks = [self.task(q, plan) for q in requests]
        results = self.runtime.map(ClientUpdate(self.recipe, self.model_fn), tasks)
        return {rep.client: rep for rep in results}

    def task(self, request: Request, plan: ParamPlan) -> ClientTask:
        """``request`` as the task its simulated client runs."""
        c = request.client
        lacks = _keys(request.handover) if request.handover is not None else ()
        return ClientTask(
            client=c,
            round=request.round,
            seed=request.seed,
            downlink=request.downlink,
            data=self.data(c),
            **holdings(self.state, plan, c, lacks),
            start_sha256=request.start_sha256,
            setup=request.setup,
            memory=self.state.holdings.memory.get(c, {}),
            broadcast=request.broadcast,
            handover=request.handover,
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
