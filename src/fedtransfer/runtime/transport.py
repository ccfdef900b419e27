"""How tasks reach worker processes and results come back: pickling in which big inputs travel once.

Shared by :class:`~fedtransfer.runtime.pool.ProcessRuntime` and
:class:`~fedtransfer.runtime.ray.RayRuntime`; it knows nothing of federated learning.

* Dense CPU tensors are pickled as their raw bytes (a view pickles only its own elements,
  never the whole storage it belongs to).
* An input tensor of at least :data:`SHARED_MIN_BYTES` is sent to a given worker once and
  referenced by a token afterwards, for as long as the caller keeps that tensor object alive and
  unmodified (its ``_version``): a client's data and the frozen pre-trained weights cross the
  process boundary once per worker, not once per round, and a worker sees the same tensor object
  each round (so identity-keyed caches there, such as frozen-trunk features, keep hitting). A big
  ``bytes`` object shared by the tasks of one map (the broadcast global model) is sent once per
  worker and map.
* Tasks go out in chunks (guided self-scheduling: big chunks first, single tasks at the end),
  at most :data:`DEPTH` chunks in flight per worker so that a worker never waits for the next.

This module is the caller's side (:class:`Encoder`, :func:`run_map`); tensors as raw bytes are
:mod:`.pickling`, the worker's side :mod:`.worker`, the errors a map raises :mod:`.failures`
(their names are importable from here too).
"""

from __future__ import annotations

import io
import itertools
import math
import pickle
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from fedtransfer.errors import ConfigError
from fedtransfer.runtime.failures import (
    Fatal,
    RemoteTraceback,
    WorkerLost,
    _describe,
    _Lost,
    _lost_error,
)
from fedtransfer.runtime.pickling import PROTOCOL, _picklers, _plain, dumps
from fedtransfer.runtime.pickling import _dense as _dense
from fedtransfer.runtime.worker import (
    Reply,
    Worker,
    prepare_worker,
    usable_cpus,
    worker_settings,
)

__all__ = [
    "DEPTH",
    "PROTOCOL",
    "SHARED_MIN_BYTES",
    "Channel",
    "Encoder",
    "Fatal",
    "RemoteTraceback",
    "Reply",
    "Traffic",
    "Worker",
    "WorkerLost",
    "dumps",
    "prepare_worker",
    "run_map",
    "usable_cpus",
    "worker_settings",
]

SHARED_MIN_BYTES = 16 * 1024
"""Inputs at least this big (tensors, and bytes shared within a map) are sent once per worker."""

DEPTH = 2
"""Chunks in flight per worker: one running, one waiting."""

# --- the caller's side ------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    token: int
    key: int  # id() of the object
    ref: Callable[[], Any]  # a weak reference, or for map-scoped bytes a strong one
    version: int
    holders: set[int] = field(default_factory=set)


@dataclass
class _Peer:
    """What one worker holds, as the caller knows it."""

    sent: set[int] = field(default_factory=set)
    evict: list[int] = field(default_factory=list)
    fn: bytes | None = None
    seq: int = 0


@dataclass
class Traffic:
    """Bytes a runtime moved, since it started its workers (all of them, both ways)."""

    bytes_to_workers: int = 0
    bytes_from_workers: int = 0
    messages: int = 0


class Encoder:
    """Builds the messages for ``workers`` workers, tracking which inputs each already holds."""

    def __init__(self, workers: int, base: type[pickle.Pickler] = pickle.Pickler) -> None:
        self.base = base
        self._by_value, self._with_tokens = _picklers(base)
        self._peers = [_Peer() for _ in range(workers)]
        self._by_id: dict[int, _Entry] = {}
        self._by_token: dict[int, _Entry] = {}
        self._map_scoped: list[_Entry] = []
        self._dead: list[int] = []
        self._tokens = itertools.count(1)
        self._pending: tuple[int, dict[int, _Entry], list[int], bytes] | None = None
        self.traffic = Traffic()

    def function(self, fn: Callable[[Any], Any]) -> bytes:
        buf = io.BytesIO()
        self._by_value(buf, protocol=PROTOCOL).dump(fn)
        return buf.getvalue()

    def message(
        self, worker: int, chunk_id: int, fn: bytes, chunk: Sequence[tuple[int, Any]]
    ) -> bytes:
        """The message running ``chunk`` (``(index, task)`` pairs) on ``worker``; call
        :meth:`sent` once it is on its way."""
        self._collect()
        peer = self._peers[worker]
        fresh: dict[int, _Entry] = {}
        emitting: list[Any] = [None]

        def persistent(obj: Any) -> Any:
            if obj is emitting[0]:  # the object inside its own "new" record: by value
                emitting[0] = None
                return None
            kind = type(obj)
            if kind is Tensor:
                if obj.numel() * obj.element_size() < SHARED_MIN_BYTES or not _plain(obj):
                    return None
                entry = self._entry(obj, weak=True)
            elif kind is bytes and len(obj) >= SHARED_MIN_BYTES and obj is not fn:
                entry = self._entry(obj, weak=False)
            else:
                return None
            if entry.token in peer.sent or entry.token in fresh:
                return ("ref", entry.token)
            fresh[entry.token] = entry
            emitting[0] = obj
            return ("new", entry.token, obj)

        buf = io.BytesIO()
        evict = list(peer.evict)
        header = (peer.seq, chunk_id, evict, None if peer.fn == fn else fn)
        self._with_tokens(buf, persistent).dump((header, list(chunk)))
        self._pending = (worker, fresh, evict, fn)
        data = buf.getvalue()
        self.traffic.bytes_to_workers += len(data)
        self.traffic.messages += 1
        return data

    def sent(self) -> None:
        """The last message built went out: record what its worker now holds."""
        assert self._pending is not None, "sent() follows message()"
        worker, fresh, evict, fn = self._pending
        self._pending = None
        peer = self._peers[worker]
        peer.seq += 1
        peer.fn = fn
        del peer.evict[: len(evict)]
        for token, entry in fresh.items():
            peer.sent.add(token)
            entry.holders.add(worker)

    def end_map(self) -> None:
        """Release the map-scoped inputs (workers drop them with their next message)."""
        for entry in self._map_scoped:
            self._retire(entry)
        self._map_scoped = []

    def received(self, nbytes: int) -> None:
        self.traffic.bytes_from_workers += nbytes
        self.traffic.messages += 1

    def _entry(self, obj: Any, *, weak: bool) -> _Entry:
        entry = self._by_id.get(id(obj))
        version = obj._version if weak else 0
        if entry is not None:
            if entry.ref() is obj and entry.version == version:
                return entry
            self._retire(entry)  # dead, or modified in place since it was sent
        token = next(self._tokens)
        dead = self._dead
        if weak:

            def died(_: object, token: int = token) -> None:
                dead.append(token)

            ref: Callable[[], Any] = weakref.ref(obj, died)
        else:

            def ref(obj: Any = obj) -> Any:
                return obj

        entry = _Entry(token, id(obj), ref, version)
        self._by_id[id(obj)] = entry
        self._by_token[token] = entry
        if not weak:
            self._map_scoped.append(entry)
        return entry

    def _retire(self, entry: _Entry) -> None:
        if self._by_token.pop(entry.token, None) is None:
            return
        if self._by_id.get(entry.key) is entry:
            del self._by_id[entry.key]
        for w in entry.holders:
            self._peers[w].sent.discard(entry.token)
            self._peers[w].evict.append(entry.token)
        entry.holders.clear()
        entry.ref = _gone

    def _collect(self) -> None:
        while self._dead:
            entry = self._by_token.get(self._dead.pop())
            if entry is not None:
                self._retire(entry)


def _gone() -> None:
    return None


# --- scheduling -------------------------------------------------------------------------------


class Channel(Protocol):
    """Carries messages to ``workers`` workers and their replies back."""

    workers: int

    def send(self, worker: int, message: bytes) -> None:
        """Queue ``message`` for ``worker``; raise :class:`_Lost` if it is gone."""

    def receive(self) -> tuple[int, bytes]:
        """The next reply of any worker with work in flight; raise :class:`_Lost` if one died."""


def run_map(
    channel: Channel, encoder: Encoder, fn: bytes, tasks: Sequence[Any]
) -> tuple[list[Any], BaseException | None]:
    """Run ``tasks`` on the channel's workers: the results in task order, or the error of the
    first task that failed (by task index, among those run), raised after every chunk in flight
    came back. Raises :class:`WorkerLost` or :class:`Fatal` when the workers are unusable."""
    n, workers = len(tasks), channel.workers
    results: list[Any] = [None] * n
    inflight: dict[int, tuple[int, range]] = {}  # chunk id -> (worker, task indices)
    load = [0] * workers
    chunk_ids = itertools.count()
    state = {"next": 0}
    failure: tuple[int, BaseException] | None = None

    def submit(w: int) -> None:
        lo = state["next"]
        size = max(1, math.ceil((n - lo) / (DEPTH * workers)))
        chunk = range(lo, min(n, lo + size))
        cid = next(chunk_ids)
        try:
            message = encoder.message(w, cid, fn, [(i, tasks[i]) for i in chunk])
        except Exception as exc:
            raise ConfigError(
                f"task {_unpicklable(tasks, chunk, encoder.base)} cannot be sent to a worker: "
                f"{_describe(exc)}; tasks must pickle"
            ) from exc
        try:
            channel.send(w, message)
        except _Lost as lost:
            raise _lost_error(lost, inflight, chunk) from None
        encoder.sent()
        state["next"] = chunk.stop
        inflight[cid] = (w, chunk)
        load[w] += 1

    try:
        for _ in range(DEPTH):
            for w in range(workers):
                if state["next"] < n:
                    submit(w)
        while inflight:
            try:
                w, data = channel.receive()
            except _Lost as lost:
                raise _lost_error(lost, inflight) from None
            encoder.received(len(data))
            reply: Reply = pickle.loads(data)
            if reply.fatal:
                raise Fatal(reply.fatal)
            inflight.pop(reply.chunk_id)
            load[w] -= 1
            for index, result in reply.results:
                results[index] = result
            if reply.failed is not None and (failure is None or reply.failed < failure[0]):
                exc = pickle.loads(reply.error)
                exc.__cause__ = RemoteTraceback(reply.remote_traceback)
                failure = (reply.failed, exc)
            while failure is None and state["next"] < n and load[w] < DEPTH:
                submit(w)
    finally:
        encoder.end_map()
    return results, (failure[1] if failure else None)


def _unpicklable(tasks: Sequence[Any], chunk: range, base: type[pickle.Pickler]) -> int:
    for i in chunk:
        try:
            dumps(tasks[i], base)
        except Exception:
            return i
    return chunk.start
