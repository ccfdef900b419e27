"""What goes down in a round, as bytes: the global model, the objective's broadcast, the
starting weights (set-up) for clients new to the run, and stage hand-overs."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from fedtransfer import tree
from fedtransfer.client.update import SETUP_CODEC, worker_model
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Request
from fedtransfer.state import ServerState
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import State


@dataclass(frozen=True, eq=False)
class Outbound:
    """What the server sends a round's clients: one :class:`Request` per client, built from
    the encoded global shared keys and objective broadcast (the same bytes for every client),
    the starting weights (to clients new to the run) and stage hand-overs (to clients behind
    a stage), and the plan the round encodes with."""

    plan: ParamPlan
    requests: tuple[Request, ...]
    new_clients: tuple[str, ...]

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(q.client for q in self.requests)

    @property
    def bytes_down(self) -> int:
        """The ledger's downlink bytes: global model, broadcast and hand-overs."""
        return sum(q.nbytes - len(q.setup or b"") for q in self.requests)

    @property
    def setup_bytes(self) -> int:
        """The ledger's set-up bytes: the starting weights sent to new clients."""
        return sum(len(q.setup or b"") for q in self.requests)

    def set_up(
        self, state: ServerState, answered: Collection[str], lost: Collection[str] = ()
    ) -> tuple[str, ...]:
        """The clients set up after this round: those before it, and the new ones that
        answered (one that never answered may not hold the starting weights: it is sent them
        again the next time it is picked), less those that say they lost them (``lost``: a
        restarted deployed client)."""
        new = {c for c in self.new_clients if c in answered}
        return tuple(sorted((set(state.distribution.set_up) - set(lost)) | new))


def distribute(
    recipe: Recipe,
    state: ServerState,
    clients: Sequence[str],
    *,
    model_fn: Callable[[], nn.Module],
    handover: Mapping[str, Sequence[str]] | None = None,
) -> Outbound:
    """Encode what the server sends ``clients`` in round ``state.round + 1``: ``handover``
    names, for clients behind a stage, the keys whose current values they lack
    (:meth:`~fedtransfer.rounds.schedule.Schedule.handover`)."""
    _, plan = worker_model(recipe.policy, model_fn)  # built once per (policy, model)
    downlink = recipe.downlink.encode(state.params).to_bytes()
    told = recipe.objective.broadcast(_part(state.server, "objective/"))
    broadcast = recipe.downlink.encode(told).to_bytes() if told else None
    set_up = set(state.distribution.set_up)
    new_clients = tuple(c for c in clients if c not in set_up)
    setup = SETUP_CODEC.encode(state.distribution.start).to_bytes() if new_clients else None
    handovers = {
        c: SETUP_CODEC.encode(tree.select(state.distribution.start, k)).to_bytes()
        for c, k in (handover or {}).items()
        if c in clients
    }
    requests = tuple(
        Request(
            client=c,
            round=state.round + 1,
            seed=state.seed,
            stage=state.distribution.stage,
            start_sha256=state.distribution.start_sha256,
            downlink=downlink,
            broadcast=broadcast,
            setup=setup if c in new_clients else None,
            handover=handovers.get(c),
        )
        for c in clients
    )
    return Outbound(plan, requests, new_clients)


def _part(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
