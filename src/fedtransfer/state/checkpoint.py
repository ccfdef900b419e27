"""Checkpoints of a ``ServerState``: saved atomically as safetensors (tensors) + JSON
(everything else), loaded with the starting weights' hash verified."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fedtransfer import tree
from fedtransfer.errors import CompatibilityError
from fedtransfer.state.clientstore import (
    ClientStore,
    PerClient,
    digests,
    pin,
    pools_of,
    restore,
    unpin,
)
from fedtransfer.state.server import ClientHoldings, Distribution, InFlight, Pending, ServerState

DIGESTS = "digests.json"
"""The sha256 of each file of a checkpoint folder (:data:`CONTENT`), written last and checked
before anything is read."""
CONTENT = ("state.safetensors", "state.json")
_CHECKPOINT_NAME = re.compile(r"round-\d{5,}-[0-9a-f]{8}")

log = logging.getLogger(__name__)

FORMAT = "fedtransfer-state/1"
FORMAT_STORES = "fedtransfer-state/2"
"""The format of checkpoints whose client states live in a :class:`ClientStore` (``stores`` in
``state.json`` names its directory and client ids, the tensor ``stores/<group>/digests`` their
files); older readers refuse them instead of silently dropping the clients' states."""
STORE_GROUPS = {"clients": "local", "memory": "memory"}
"""The checkpoint's name of each part of the clients' holdings, and the part's attribute."""


def _group(state: ServerState, group: str) -> PerClient:
    per_client: PerClient = getattr(state.holdings, STORE_GROUPS[group])
    return per_client


def _flatten(state: ServerState) -> dict[str, Tensor]:
    flat: dict[str, Tensor] = {}
    for prefix, part in (
        ("params/", state.params),
        ("start/", state.distribution.start),
        ("server/", state.server),
    ):
        flat.update({prefix + k: v.detach().clone() for k, v in part.items()})
    for group in STORE_GROUPS:
        per_client = _group(state, group)
        if isinstance(per_client, ClientStore):  # referenced by state.json, not copied
            continue
        for i, client in enumerate(sorted(per_client)):
            flat.update(
                {f"{group}/{i}/{k}": v.detach().clone() for k, v in per_client[client].items()}
            )
    for i, item in enumerate(state.inflight.pending):
        flat.update(item.tensors(f"pending/{i}/"))
    for group in STORE_GROUPS:
        store = _group(state, group)
        if isinstance(store, ClientStore):
            flat[f"stores/{group}/digests"] = digests(store)
    return flat


def save_state(
    state: ServerState,
    directory: str | os.PathLike[str],
    *,
    keep: int = 2,
    history: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write ``state`` to a new ``directory/round-NNNNN-<id>/`` and point ``latest.json`` at it;
    ``history`` is the caller's JSON-safe record of the rounds so far, kept with it
    (:func:`load_history`).

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
    pools = pools_of(*(_group(state, group) for group in STORE_GROUPS))
    dist, flight = state.distribution, state.inflight
    meta = {
        "format": FORMAT_STORES if pools else FORMAT,
        "round": state.round,
        "seed": state.seed,
        "start_sha256": dist.start_sha256,
        "clients": _flat_ids(state.holdings.local),
        "memory": _flat_ids(state.holdings.memory),
        "set_up": list(dist.set_up),
        "ledger": state.ledger,
        "history": [dict(record) for record in history],
        "pending": [item.meta() for item in flight.pending],
        "clock": flight.clock,
        "stage": dist.stage,
        "synced": dist.synced,
    }
    if pools:
        meta["stores"] = _store_refs(state, root)
    _write_json(tmp / "state.json", meta)
    _write_json(tmp / DIGESTS, {name: tree.file_sha256(tmp / name) for name in CONTENT})
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
        store = _group(state, group)
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


def _latest(root: Path) -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint folder and its ``state.json``: the one ``latest.json``
    points at, or, if that one is damaged (its files do not match their recorded digests, or
    do not parse), the newest kept one that is intact, with a warning naming both; a
    :class:`CompatibilityError` listing what is wrong with each if none is."""
    pointer = root / "latest.json"
    if not pointer.exists():
        raise CompatibilityError(f"no checkpoint in {root}: latest.json is missing")
    problems: list[str] = []
    try:
        named = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        named = None
        problems.append(f"{pointer}: unreadable ({exc!r})")
    if named is not None and not (isinstance(named, str) and _CHECKPOINT_NAME.fullmatch(named)):
        raise CompatibilityError(
            f"{pointer} names {named!r}, not a checkpoint folder of this directory "
            "(round-NNNNN-xxxxxxxx); refusing to follow it outside its own arm"
        )
    kept = sorted((p for p in root.glob("round-*") if p.is_dir()), reverse=True)
    order = ([root / named] if named is not None else []) + [p for p in kept if p.name != named]
    for folder in order:
        try:
            meta = _intact(folder)
        except CompatibilityError as exc:
            problems.append(str(exc))
            continue
        if problems:
            log.warning(
                "checkpoint %s is damaged (%s); resuming from %s instead",
                named,
                problems[0],
                folder.name,
            )
        return folder, meta
    raise CompatibilityError(
        f"no intact checkpoint in {root}: " + "; ".join(problems or ["no checkpoint folders"])
    )


def _intact(folder: Path) -> dict[str, Any]:
    """``folder``'s ``state.json``, after checking every file against its recorded digest."""
    try:
        recorded = json.loads((folder / DIGESTS).read_text())
    except (OSError, ValueError) as exc:
        raise CompatibilityError(f"{folder.name}: {DIGESTS} unreadable ({exc})") from None
    for name in CONTENT:
        try:
            seen = tree.file_sha256(folder / name)
        except OSError as exc:
            raise CompatibilityError(f"{folder.name}/{name}: unreadable ({exc})") from None
        if not isinstance(recorded, dict) or seen != recorded.get(name):
            raise CompatibilityError(
                f"{folder.name}/{name}: sha256 {seen[:12]}… does not match the recorded "
                f"{str(recorded.get(name) if isinstance(recorded, dict) else None)[:12]}… "
                "(the file was damaged or edited)"
            )
    meta: dict[str, Any] = json.loads((folder / "state.json").read_text())
    if meta.get("format") not in (FORMAT, FORMAT_STORES):
        raise CompatibilityError(
            f"{folder}: format {meta.get('format')!r}, expected {FORMAT!r} or {FORMAT_STORES!r}"
        )
    return meta


def load_history(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], ...]:
    """The ``history`` saved with the latest checkpoint in ``directory``."""
    _, meta = _latest(Path(directory))
    return tuple(meta["history"])


def load_state(directory: str | os.PathLike[str]) -> ServerState:
    """Load the checkpoint ``latest.json`` points at, verifying the starting weights' hash."""
    root = Path(directory)
    folder, meta = _latest(root)
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
        distribution=Distribution(
            start=start,
            start_sha256=meta["start_sha256"],
            set_up=tuple(meta["set_up"]),
            stage=int(meta.get("stage", 0)),
            synced={c: int(i) for c, i in meta.get("synced", {}).items()},
        ),
        server=part("server/"),
        holdings=ClientHoldings(groups["clients"], groups["memory"]),
        inflight=InFlight(
            pending=tuple(
                Pending.load(m, part(f"pending/{i}/"))
                for i, m in enumerate(meta.get("pending", []))
            ),
            clock=float(meta.get("clock", 0.0)),
        ),
        ledger={k: int(v) for k, v in meta["ledger"].items()},
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
