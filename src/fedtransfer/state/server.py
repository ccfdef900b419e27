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
from fedtransfer.transfer.schedule import stage_recipe
from fedtransfer.types import State


@dataclass(frozen=True, eq=False)
class ServerState:
    """Everything the server knows after ``round`` rounds.

    * ``params`` — the global shared parameters θ;
    * ``start`` — the full starting weights (set-up distribution), hash ``start_sha256``;
    * ``server`` — the server pipeline's state;
    * ``clients`` — each client's local keys, as the client keeps them (simulation);
    * ``memory`` — each client's objective memory (control variates, personal models), as the
      client keeps it;

      both are dicts, or, for large populations, :class:`~fedtransfer.state.clientstore.ClientStore`
      mappings that keep each client's tensors on disk and a bounded cache in memory
      (``initial(..., client_store=directory)``); a round updates either without
      materialising the population (:func:`~fedtransfer.state.clientstore.merged`);
    * ``set_up`` — clients that have received and verified the starting weights;
    * ``ledger`` — cumulative bytes: ``setup``, ``up``, ``down``;
    * ``history`` — one metrics record per finished round (JSON-safe);
    * ``pending`` / ``clock`` — asynchronous runs only: updates still in flight and the
      simulated time (see :mod:`fedtransfer.rounds.buffered`);
    * ``stage`` / ``synced`` — staged schedules only (:mod:`fedtransfer.transfer.schedule`):
      the current stage, and for each set-up client the stage whose starting weights it holds.
    """

    round: int
    seed: int
    params: dict[str, Tensor]
    start: dict[str, Tensor]
    start_sha256: str
    server: State = field(default_factory=dict)
    clients: PerClient = field(default_factory=dict)
    memory: PerClient = field(default_factory=dict)
    set_up: tuple[str, ...] = ()
    ledger: dict[str, int] = field(default_factory=lambda: {"setup": 0, "up": 0, "down": 0})
    history: tuple[dict[str, Any], ...] = ()
    pending: tuple[Pending, ...] = ()
    clock: float = 0.0
    stage: int = 0
    synced: dict[str, int] = field(default_factory=dict)

    @classmethod
    def initial(
        cls,
        recipe: Recipe,
        model: nn.Module,
        *,
        seed: int,
        client_store: str | os.PathLike[str] | None = None,
    ) -> ServerState:
        """Round-0 state from a (pre-trained or freshly initialised) model.

        With ``client_store``, ``clients`` and ``memory`` are :class:`ClientStore` mappings over
        that directory (created if needed): each client's local keys and objective memory live
        on disk, so memory stays bounded by the cohort for populations of 10 000+ clients.
        Checkpoints (:func:`save_state`) then reference the store's files instead of copying
        them; keep the store directory next to the checkpoints (e.g. ``run/clients`` beside
        ``run/checkpoints``) and use it from one process at a time.
        """
        recipe, _ = stage_recipe(recipe, 1)
        prepared = recipe.policy.prepare(model)
        plan = recipe.policy.plan(prepared)
        start = tree.clone(prepared.state_dict())
        params = tree.clone(tree.select(start, plan.shared))
        server = recipe.pipeline.init(params)
        objective = recipe.objective.server_init(params, plan)
        server.update({f"objective/{k}": v.clone() for k, v in objective.items()})
        clients: PerClient = {}
        memory: PerClient = {}
        if client_store is not None:
            clients, memory = ClientStore.open(client_store), ClientStore.open(client_store)
        return cls(
            round=0,
            seed=seed,
            params=params,
            start=start,
            start_sha256=tree.sha256(start),
            server=server,
            clients=clients,
            memory=memory,
        )

    def weights_for(self, client: str | None = None) -> dict[str, Tensor]:
        """Full state dict of the model a client holds: start ▸ global shared ▸ its local keys."""
        out = dict(self.start)
        out.update(self.params)
        if client is not None:
            out.update(self.clients.get(client, {}))
        return out

    def replace(self, **changes: Any) -> ServerState:
        return replace(self, **changes)


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
