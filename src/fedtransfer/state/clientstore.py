"""``ClientStore``: what each client keeps (local keys, objective memory) on disk, a few in memory.

With 10 000+ clients, holding every client's local keys and objective memory (a SCAFFOLD
control variate is the size of the shared model) in ``ServerState.clients`` /
``ServerState.memory`` as dicts makes memory grow with the population. A :class:`ClientStore`
is a drop-in :class:`~collections.abc.Mapping` of client id → tensors that keeps each client's
tensors in a safetensors file and only a bounded LRU cache of them in memory, so memory is
bounded by the cohort, not the population. Turn it on with
``ServerState.initial(recipe, model, seed=0, client_store="runs/x/clients")``.

Files are content-addressed (``objects/ab/<sha256>.safetensors``) and never modified: a round
writes new files for the clients it heard from and returns a new store (the old one, and any
checkpoint naming its files, still reads the old values). :func:`fedtransfer.save_state`
*pins* the files a checkpoint references (``pins/<checkpoint>.bin``: their raw digests) before
the checkpoint becomes ``latest``, and unpins them when it prunes the checkpoint;
:meth:`ClientStore.collect` (run by every ``save_state``) deletes the files that no pin and no
store alive in this process references (the files themselves: :mod:`.storefiles`). One
process at a time may use a store directory.

Memory per client ever heard from is one dict entry and a 32-byte digest per store; checkpoints
record the digests as one tensor, not a string per client, so saving does not churn memory in
proportion to the population either.

>>> import tempfile, torch
>>> folder = tempfile.TemporaryDirectory()
>>> store = ClientStore.open(folder.name)
>>> later = store.updated({"c0": {"head.bias": torch.zeros(2)}})
>>> (len(store), len(later), later["c0"]["head.bias"].tolist())
(0, 1, [0.0, 0.0])
>>> folder.cleanup()
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.state.storefiles import DIGEST_BYTES, _Pool
from fedtransfer.state.storefiles import FORMAT as FORMAT

PerClient = Mapping[str, dict[str, Tensor]]
"""``ServerState.clients`` / ``ServerState.memory``: a dict or a :class:`ClientStore`."""

_POOLS: weakref.WeakValueDictionary[str, _Pool] = weakref.WeakValueDictionary()
_POOLS_LOCK = threading.Lock()
_SERIAL = itertools.count()


def _pool(
    directory: str | os.PathLike[str], cache_size: int | None, cache_bytes: int | None
) -> _Pool:
    root = Path(directory).resolve()
    with _POOLS_LOCK:
        pool = _POOLS.get(str(root))
        if pool is None:
            pool = _Pool(
                root,
                cache_size=ClientStore.CACHE_SIZE if cache_size is None else cache_size,
                cache_bytes=ClientStore.CACHE_BYTES if cache_bytes is None else cache_bytes,
            )
            _POOLS[str(root)] = pool
        else:
            pool.cache_size = pool.cache_size if cache_size is None else cache_size
            pool.cache_bytes = pool.cache_bytes if cache_bytes is None else cache_bytes
        return pool


class ClientStore(Mapping[str, dict[str, Tensor]]):
    """An immutable mapping client id → that client's tensors, kept on disk under a directory.

    Reading ``store[c]`` loads the client's tensors (through an LRU cache of at most
    ``cache_size`` clients and ``cache_bytes`` bytes, shared by the stores over the same
    directory); :meth:`updated` writes new values and returns a new store; nothing is ever
    modified in place, so older stores (earlier rounds' states, checkpoints) stay valid.
    Iteration order is insertion order, as for the dicts it replaces.

    Open one with :meth:`open` (or let ``ServerState.initial(..., client_store=dir)`` do it).
    """

    CACHE_SIZE = 64
    """Default bound of the in-memory cache, in clients."""
    CACHE_BYTES = 256 * 2**20
    """Default bound of the in-memory cache, in bytes of stored tensors."""

    __slots__ = ("__weakref__", "_index", "_pool")

    def __init__(self, pool: _Pool, index: dict[str, bytes]) -> None:
        self._pool = pool
        self._index = index
        pool.live[next(_SERIAL)] = self

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        cache_size: int | None = None,
        cache_bytes: int | None = None,
    ) -> ClientStore:
        """An empty store over ``directory`` (created if needed; files already there are kept
        until :meth:`collect` finds nothing references them)."""
        for name, value in (("cache_size", cache_size), ("cache_bytes", cache_bytes)):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ConfigError(f"ClientStore: {name} must be an integer >= 0, got {value!r}")
        return cls(_pool(directory, cache_size, cache_bytes), {})

    @classmethod
    def at(cls, directory: str | os.PathLike[str], index: Mapping[str, str]) -> ClientStore:
        """The store over ``directory`` naming the files ``index`` (client → sha256): what a
        checkpoint recorded. Raises :class:`CompatibilityError` if a file is missing."""
        try:
            raw = {c: bytes.fromhex(d) for c, d in index.items()}
        except ValueError as exc:
            raise CompatibilityError(f"client store index: not a sha256 digest: {exc}") from None
        return cls._checked(directory, raw)

    @classmethod
    def _checked(cls, directory: str | os.PathLike[str], index: dict[str, bytes]) -> ClientStore:
        store = cls(_pool(directory, None, None), index)
        missing = [c for c, d in store._index.items() if not os.path.exists(store._pool.path(d))]
        if missing:
            raise CompatibilityError(
                f"client store {store.root}: files of {len(missing)} clients are missing "
                f"(e.g. {missing[:3]}); the checkpoint references a store that was modified"
            )
        return store

    @property
    def root(self) -> Path:
        return self._pool.root

    @property
    def index(self) -> dict[str, str]:
        """Client id → sha256 (hex) of the file holding its tensors."""
        return {c: d.hex() for c, d in self._index.items()}

    def __getitem__(self, client: str) -> dict[str, Tensor]:
        return self._pool.read(self._index[client])

    def __contains__(self, client: object) -> bool:
        return client in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClientStore):  # files are content-addressed
            return self.root == other.root and self._index == other._index
        return NotImplemented

    def __repr__(self) -> str:
        return f"ClientStore({self.root.name!r}, {len(self)} clients)"

    def updated(
        self,
        changes: Mapping[str, Mapping[str, Tensor]] | Iterable[tuple[str, Mapping[str, Tensor]]],
    ) -> ClientStore:
        """A new store: this one with the clients in ``changes`` set to the given tensors
        (written to disk now, one client at a time, so an iterable streams)."""
        items = changes.items() if isinstance(changes, Mapping) else changes
        index = dict(self._index)
        for client, tensors in items:
            index[client] = self._pool.write(tensors)
        return ClientStore(self._pool, index)

    def emptied(self) -> ClientStore:
        """An empty store over the same directory."""
        return ClientStore(self._pool, {})

    def cached(self) -> int:
        """How many clients' tensors the shared in-memory cache holds now."""
        return len(self._pool.cache)

    def disk_reads(self) -> int:
        """How many files the stores over this directory have read from disk so far."""
        return self._pool.reads

    def collect(self) -> int:
        """Delete the files that no pinned checkpoint and no store alive in this process
        references; returns how many were deleted."""
        return self._pool.collect()


def merged(per_client: PerClient, changes: Mapping[str, dict[str, Tensor]]) -> PerClient:
    """``per_client`` with ``changes`` applied: ``{**per_client, **changes}`` for a dict, a new
    :class:`ClientStore` (written through to disk) for a store."""
    if isinstance(per_client, ClientStore):
        return per_client.updated(changes) if changes else per_client
    return {**per_client, **changes}


def mapped(
    per_client: PerClient, fn: Callable[[dict[str, Tensor]], dict[str, Tensor]]
) -> PerClient:
    """Every client's tensors passed through ``fn``; a store streams, one client at a time."""
    if isinstance(per_client, ClientStore):
        return per_client.emptied().updated((c, fn(per_client[c])) for c in per_client)
    return {c: fn(held) for c, held in per_client.items()}


def emptied(per_client: PerClient) -> PerClient:
    """No client: ``{}``, or an empty store over the same directory."""
    return per_client.emptied() if isinstance(per_client, ClientStore) else {}


def pools_of(*groups: PerClient) -> dict[Path, list[ClientStore]]:
    """The stores among ``groups``, by directory (for checkpoints)."""
    out: dict[Path, list[ClientStore]] = {}
    for group in groups:
        if isinstance(group, ClientStore):
            out.setdefault(group.root, []).append(group)
    return out


def pin(stores: list[ClientStore], name: str) -> None:
    """Make the files of ``stores`` (all over one directory) durable and pin them as ``name``."""
    stores[0]._pool.pin(name, (d for s in stores for d in s._index.values()))


def digests(store: ClientStore) -> Tensor:
    """What a checkpoint records of ``store`` besides its client ids (``list(store)``): their
    files' raw digests, a ``uint8`` tensor ``[client, 32]`` (one buffer, not a string each)."""
    blob = b"".join(store._index.values())
    flat = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0)
    return flat.to(torch.uint8).reshape(-1, DIGEST_BYTES)


def restore(directory: str | os.PathLike[str], clients: list[str], digests: Tensor) -> ClientStore:
    """The store a checkpoint recorded (ids and :func:`digests`); raises
    :class:`~fedtransfer.errors.CompatibilityError` if it does not fit or a file is missing."""
    if digests.dtype != torch.uint8 or tuple(digests.shape) != (len(clients), DIGEST_BYTES):
        raise CompatibilityError(
            f"client store checkpoint: digests of shape {tuple(digests.shape)} "
            f"{digests.dtype}, expected ({len(clients)}, {DIGEST_BYTES}) uint8"
        )
    blob = digests.contiguous().numpy().tobytes()
    rows = range(0, len(blob), DIGEST_BYTES)
    return ClientStore._checked(
        directory, dict(zip(clients, (blob[i : i + DIGEST_BYTES] for i in rows), strict=True))
    )


def unpin(directory: str | os.PathLike[str], name: str) -> None:
    """Drop the pin ``name`` in the store at ``directory`` (nothing if there is none)."""
    if (Path(directory) / "store.json").exists():
        _pool(directory, None, None).unpin(name)
