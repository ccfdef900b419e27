"""``ServerState`` as plain data, saved atomically as safetensors (tensors) + JSON (everything else)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.clientstore import (
    ClientStore,
    PerClient,
    digests,
    pin,
    pools_of,
    restore,
    unpin,
)
from fedtransfer.errors import CompatibilityError
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Reply
from fedtransfer.transfer.schedule import stage_recipe
from fedtransfer.types import State

FORMAT = "fedtransfer-state/1"
FORMAT_STORES = "fedtransfer-state/2"
"""The format of checkpoints whose client states live in a :class:`ClientStore` (``stores`` in
``state.json`` names its directory and client ids, the tensor ``stores/<group>/digests`` their
files); older readers refuse them instead of silently dropping the clients' states."""
STORE_GROUPS = ("clients", "memory")


@dataclass(frozen=True, eq=False)
class ServerState:
    """Everything the server knows after ``round`` rounds.

    * ``params`` — the global shared parameters θ;
    * ``start`` — the full starting weights (set-up distribution), hash ``start_sha256``;
    * ``server`` — the server pipeline's state;
    * ``clients`` — each client's local keys, as the client keeps them (simulation);
    * ``memory`` — each client's objective memory (control variates, personal models), as the
      client keeps it;

      both are dicts, or, for large populations, :class:`~fedtransfer.clientstore.ClientStore`
      mappings that keep each client's tensors on disk and a bounded cache in memory
      (``initial(..., client_store=directory)``); a round updates either without
      materialising the population (:func:`~fedtransfer.clientstore.merged`);
    * ``set_up`` — clients that have received and verified the starting weights;
    * ``ledger`` — cumulative bytes: ``setup``, ``up``, ``down``;
    * ``history`` — one metrics record per finished round (JSON-safe);
    * ``pending`` / ``clock`` — asynchronous runs only: updates still in flight and the
      simulated time (see :mod:`fedtransfer.buffered`);
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


def _flatten(state: ServerState) -> dict[str, Tensor]:
    flat: dict[str, Tensor] = {}
    for prefix, part in (
        ("params/", state.params),
        ("start/", state.start),
        ("server/", state.server),
    ):
        flat.update({prefix + k: v.detach().clone() for k, v in part.items()})
    for group in STORE_GROUPS:
        per_client: PerClient = getattr(state, group)
        if isinstance(per_client, ClientStore):  # referenced by state.json, not copied
            continue
        for i, client in enumerate(sorted(per_client)):
            flat.update(
                {f"{group}/{i}/{k}": v.detach().clone() for k, v in per_client[client].items()}
            )
    for i, item in enumerate(state.pending):
        flat.update(item.tensors(f"pending/{i}/"))
    for group in STORE_GROUPS:
        store = getattr(state, group)
        if isinstance(store, ClientStore):
            flat[f"stores/{group}/digests"] = digests(store)
    return flat


def save_state(state: ServerState, directory: str | os.PathLike[str], *, keep: int = 2) -> Path:
    """Write ``state`` to a new ``directory/round-NNNNN-<id>/`` and point ``latest.json`` at it.

    The new folder is complete before ``latest.json`` is atomically replaced, and no folder is
    removed until then, so a crash at any moment leaves ``latest.json`` naming a complete
    checkpoint. Afterwards only the newest ``keep`` folders remain.

    Clients' states held in a :class:`ClientStore` are not copied: the checkpoint names the
    store (relative to ``directory``), its client ids and each client's file (by digest), and
    the files are made durable and pinned in the store (as ``round-…``) before the folder
    becomes the checkpoint. Store files never change, so later rounds cannot alter this
    checkpoint; when a folder is pruned its pin goes, and the store's files that no pin and no
    live state references are deleted.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:05d}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    save_file(_flatten(state), str(tmp / "state.safetensors"))
    pools = pools_of(*(getattr(state, group) for group in STORE_GROUPS))
    meta = {
        "format": FORMAT_STORES if pools else FORMAT,
        "round": state.round,
        "seed": state.seed,
        "start_sha256": state.start_sha256,
        "clients": _flat_ids(state.clients),
        "memory": _flat_ids(state.memory),
        "set_up": list(state.set_up),
        "ledger": state.ledger,
        "history": list(state.history),
        "pending": [item.meta() for item in state.pending],
        "clock": state.clock,
        "stage": state.stage,
        "synced": state.synced,
    }
    if pools:
        meta["stores"] = _store_refs(state, root)
    _write_json(tmp / "state.json", meta)
    for stores in pools.values():  # after state.json: a stale folder with a pin names its stores
        pin(stores, final.name)
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _write_json(root / "latest.json", {"checkpoint": final.name, "round": state.round})
    older = sorted(p for p in root.glob("round-*") if p.is_dir() and p != final)
    for old in older[: max(0, len(older) - (keep - 1))]:
        _remove_checkpoint(old, old.name)
    for stale in root.glob(".tmp-round-*"):
        _remove_checkpoint(stale, stale.name.removeprefix(".tmp-"))
    for stores in pools.values():
        stores[0].collect()
    return final


def _flat_ids(per_client: PerClient) -> list[str]:
    return [] if isinstance(per_client, ClientStore) else sorted(per_client)


def _store_refs(state: ServerState, root: Path) -> dict[str, Any]:
    """For each group held in a store: its directory relative to ``root`` and its client ids
    in order (their files' digests are the tensor ``stores/<group>/digests``)."""
    out: dict[str, Any] = {}
    for group in STORE_GROUPS:
        store = getattr(state, group)
        if isinstance(store, ClientStore):
            out[group] = {"path": os.path.relpath(store.root, root.resolve()), "ids": list(store)}
    return out


def _stored_groups(folder: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    if meta is None:
        try:
            meta = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            return {}
    stores: dict[str, Any] = meta.get("stores", {})
    return stores


def _remove_checkpoint(folder: Path, name: str) -> None:
    """Remove a checkpoint folder, then its pins in the stores it references (in this order:
    a crash in between leaves a pin without a checkpoint, which only keeps files longer)."""
    paths = {ref["path"] for ref in _stored_groups(folder).values()}
    shutil.rmtree(folder, ignore_errors=True)
    for path in sorted(paths):
        unpin(folder.parent / path, name)


def load_state(directory: str | os.PathLike[str]) -> ServerState:
    """Load the checkpoint ``latest.json`` points at, verifying the starting weights' hash."""
    root = Path(directory)
    pointer = root / "latest.json"
    if not pointer.exists():
        raise CompatibilityError(f"no checkpoint in {root}: latest.json is missing")
    folder = root / json.loads(pointer.read_text())["checkpoint"]
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") not in (FORMAT, FORMAT_STORES):
        raise CompatibilityError(
            f"{folder}: format {meta.get('format')!r}, expected {FORMAT!r} or {FORMAT_STORES!r}"
        )
    flat = load_file(str(folder / "state.safetensors"))

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}

    groups: dict[str, PerClient] = {
        "clients": {c: part(f"clients/{i}/") for i, c in enumerate(meta["clients"])},
        "memory": {c: part(f"memory/{i}/") for i, c in enumerate(meta.get("memory", []))},
    }
    for group, ref in _stored_groups(folder, meta).items():
        recorded = flat.get(f"stores/{group}/digests")
        if recorded is None:
            raise CompatibilityError(f"{folder}: the digests of the {group} store are missing")
        groups[group] = restore(root / ref["path"], [str(c) for c in ref["ids"]], recorded)
    start = part("start/")
    if tree.sha256(start) != meta["start_sha256"]:
        raise CompatibilityError(
            f"{folder}: starting weights hash {tree.sha256(start)[:12]}… does not match the "
            f"recorded {meta['start_sha256'][:12]}…; the checkpoint is corrupted"
        )
    return ServerState(
        round=int(meta["round"]),
        seed=int(meta["seed"]),
        params=part("params/"),
        start=start,
        start_sha256=meta["start_sha256"],
        server=part("server/"),
        clients=groups["clients"],
        memory=groups["memory"],
        set_up=tuple(meta["set_up"]),
        ledger={k: int(v) for k, v in meta["ledger"].items()},
        history=tuple(meta["history"]),
        pending=tuple(
            Pending.load(m, part(f"pending/{i}/")) for i, m in enumerate(meta.get("pending", []))
        ),
        clock=float(meta.get("clock", 0.0)),
        stage=int(meta.get("stage", 0)),
        synced={c: int(i) for c, i in meta.get("synced", {}).items()},
    )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # one C-encoded string: json.dump (and any indent) encodes in Python, a few strings per
    # item, which for population-sized lists churns memory at every checkpoint
    text = json.dumps(data, sort_keys=True, allow_nan=True)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for item in path.iterdir():
        with open(item, "rb") as f:
            os.fsync(f.fileno())
