"""``ServerState``: everything the server knows after a round, as plain data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Reply
from fedtransfer.state.clientstore import ClientStore, PerClient
from fedtransfer.types import State


@dataclass(frozen=True, eq=False)
class Distribution:
    """What the server has given the clients: the full starting weights ``start`` (sent once,
    losslessly, at set-up; hash ``start_sha256``), the clients ``set_up`` (they verified them),
    and, in a staged schedule, the current ``stage`` and for each set-up client the stage
    whose starting weights it holds (``synced``: it is sent a hand-over when it is behind)."""

    start: dict[str, Tensor]
    start_sha256: str
    set_up: tuple[str, ...] = ()
    stage: int = 0
    synced: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ClientHoldings:
    """What the simulated clients keep between rounds, by client: their ``local`` keys and
    their ``memory`` (objective and client-transform state). A deployed client keeps its own,
    so a deployment's are empty.

    Both are dicts, or, for large populations, :class:`~fedtransfer.state.clientstore.ClientStore`
    mappings that keep each client's tensors on disk and a bounded cache in memory
    (``ServerState.initial(..., client_store=directory)``); a round updates either without
    materialising the population (:func:`~fedtransfer.state.clientstore.merged`)."""

    local: PerClient = field(default_factory=dict)
    memory: PerClient = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class InFlight:
    """Asynchronous (FedBuff) runs: the client updates still in flight, and the simulated
    clock (see :mod:`fedtransfer.rounds.buffered`)."""

    pending: tuple[Pending, ...] = ()
    clock: float = 0.0


@dataclass(frozen=True, eq=False)
class ServerState:
    """Everything the server knows after ``round`` rounds of a run seeded by ``seed``:

    * ``params`` — the global shared parameters θ;
    * ``server`` — the server pipeline's state (its optimiser's, the objective's server half);
    * ``distribution`` — the starting weights and who holds them (:class:`Distribution`);
    * ``holdings`` — what the simulated clients keep (:class:`ClientHoldings`);
    * ``inflight`` — asynchronous runs' updates in flight (:class:`InFlight`);
    * ``ledger`` — cumulative bytes: ``setup``, ``up``, ``down``.

    Checkpoints: :mod:`fedtransfer.state.checkpoint`.
    """

    round: int
    seed: int
    params: dict[str, Tensor]
    distribution: Distribution
    server: State = field(default_factory=dict)
    holdings: ClientHoldings = field(default_factory=ClientHoldings)
    inflight: InFlight = field(default_factory=InFlight)
    ledger: dict[str, int] = field(default_factory=lambda: {"setup": 0, "up": 0, "down": 0})

    @classmethod
    def initial(
        cls,
        recipe: Recipe,
        model: nn.Module,
        *,
        seed: int,
        client_store: str | os.PathLike[str] | None = None,
    ) -> ServerState:
        """Round-0 state of ``recipe`` from a (pre-trained or freshly initialised) model (of a
        schedule: :meth:`~fedtransfer.rounds.schedule.Schedule.start`).

        With ``client_store``, the holdings' ``local`` and ``memory`` are :class:`ClientStore`
        mappings over that directory (created if needed): each client's local keys and objective memory live
        on disk, so memory stays bounded by the cohort for populations of 10 000+ clients.
        Checkpoints (:func:`save_state`) then reference the store's files instead of copying
        them; keep the store directory next to the checkpoints (e.g. ``run/clients`` beside
        ``run/checkpoints``) and use it from one process at a time.
        """
        prepared = recipe.policy.prepare(model)
        plan = recipe.policy.plan(prepared)
        start = tree.clone(prepared.state_dict())
        params = tree.clone(tree.select(start, plan.shared))
        server = recipe.pipeline.init(params)
        objective = recipe.objective.server_init(params, plan)
        server.update({f"objective/{k}": v.clone() for k, v in objective.items()})
        holdings = ClientHoldings()
        if client_store is not None:
            holdings = ClientHoldings(
                ClientStore.open(client_store), ClientStore.open(client_store)
            )
        return cls(
            round=0,
            seed=seed,
            params=params,
            distribution=Distribution(start, tree.sha256(start)),
            server=server,
            holdings=holdings,
        )

    def weights_for(self, client: str | None = None) -> dict[str, Tensor]:
        """Full state dict of the model a client holds: start ▸ global shared ▸ its local keys."""
        out = dict(self.distribution.start)
        out.update(self.params)
        if client is not None:
            out.update(self.holdings.local.get(client, {}))
        return out

    def replace(self, **changes: Any) -> ServerState:
        return replace(self, **changes)

    def distributed(self, **changes: Any) -> ServerState:
        """This state with its :class:`Distribution`'s fields ``changes`` replaced."""
        return replace(self, distribution=replace(self.distribution, **changes))


@dataclass(frozen=True, eq=False)
class Pending:
    """A client update in flight (asynchronous runs): its result, the global version it was
    trained from, and when it reaches the server in simulated time."""

    result: Reply
    version: int
    arrival: float

    def meta(self) -> dict[str, Any]:
        res = self.result
        return {
            "client": res.client,
            "version": self.version,
            "arrival": self.arrival,
            "num_examples": res.num_examples,
            "metrics": res.metrics,
            "error": res.error,
        }

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        res = self.result
        # safetensors cannot hold an empty buffer; a real payload never is the single byte 0
        out = {
            f"{prefix}uplink": torch.frombuffer(bytearray(res.uplink or b"\0"), dtype=torch.uint8),
            f"{prefix}extras": torch.frombuffer(bytearray(res.extras or b"\0"), dtype=torch.uint8),
        }
        out.update({f"{prefix}local/{k}": v.detach().clone() for k, v in res.local.items()})
        out.update({f"{prefix}memory/{k}": v.detach().clone() for k, v in res.memory.items()})
        return out

    @classmethod
    def load(cls, meta: dict[str, Any], part: dict[str, Tensor]) -> Pending:
        def sub(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in part.items() if k.startswith(prefix)}

        extras = part["extras"].numpy().tobytes()
        result = Reply(
            client=meta["client"],
            uplink=b"" if meta.get("error") else part["uplink"].numpy().tobytes(),
            num_examples=int(meta["num_examples"]),
            local=sub("local/"),
            metrics={k: float(v) for k, v in meta["metrics"].items()},
            extras=b"" if extras == b"\0" else extras,
            memory=sub("memory/"),
            error=str(meta.get("error", "")),
        )
        return cls(result, int(meta["version"]), float(meta["arrival"]))
