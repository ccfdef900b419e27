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
"""

from __future__ import annotations

import copyreg
import io
import itertools
import math
import os
import pickle
import traceback
import weakref
from collections import ChainMap
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from fedtransfer.errors import ConfigError

SHARED_MIN_BYTES = 16 * 1024
"""Inputs at least this big (tensors, and bytes shared within a map) are sent once per worker."""

DEPTH = 2
"""Chunks in flight per worker: one running, one waiting."""

PROTOCOL = 5


class WorkerLost(RuntimeError):
    """A worker process or actor died while tasks were in flight; the runtime stops its workers
    and starts new ones on the next map."""


class _Lost(Exception):
    """Raised by a channel: ``worker`` is gone, ``why`` says how (``detail``: more of it)."""

    def __init__(self, worker: int, why: str, detail: str = "") -> None:
        super().__init__(why)
        self.worker = worker
        self.why = why
        self.detail = detail


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as the re-raised exception's cause)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


# --- tensors as raw bytes ---------------------------------------------------------------------


def _plain(t: Tensor) -> bool:
    """A dense, detached, ordinary CPU tensor (the kind pickled as its raw bytes)."""
    return (
        type(t) is Tensor
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and not t.requires_grad
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
    )


def _dense(t: Tensor) -> bool:
    """The elements fill a storage span without gaps or overlap (a permuted contiguous layout)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _reduce_tensor(t: Tensor) -> Any:
    if not _plain(t):
        return t.__reduce_ex__(PROTOCOL)
    stride: tuple[int, ...] | None = None
    if t.is_contiguous():
        flat = t.reshape(-1)
    elif _dense(t):  # keep the memory format (e.g. channels-last): kernels may depend on it
        flat = t.as_strided((t.numel(),), (1,), t.storage_offset())
        stride = tuple(t.stride())
    else:
        flat = t.contiguous().reshape(-1)
    raw = pickle.PickleBuffer(cast(Any, flat.view(torch.uint8).numpy()))
    return _rebuild_tensor, (t.dtype, tuple(t.shape), stride, raw)


def _rebuild_tensor(
    dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...] | None, raw: Any
) -> Tensor:
    if len(raw) == 0:
        if stride is None:
            return torch.empty(shape, dtype=dtype)
        return torch.empty_strided(shape, stride, dtype=dtype)
    if not isinstance(raw, bytearray):
        raw = bytearray(raw)
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
    return flat.view(shape) if stride is None else flat.as_strided(shape, stride)


def _picklers(base: type[pickle.Pickler]) -> tuple[type[Any], type[Any]]:
    """Two picklers over ``base``: by value, and with a ``persistent`` hook (inputs by token)."""
    inherited = getattr(base, "dispatch_table", None)  # C pickler: a descriptor, not a table
    if not isinstance(inherited, MutableMapping):
        inherited = copyreg.dispatch_table
    table: ChainMap[Any, Any] = ChainMap({Tensor: _reduce_tensor}, inherited)

    class ByValue(base):  # type: ignore[valid-type,misc]
        dispatch_table = table

    class WithTokens(base):  # type: ignore[valid-type,misc]
        dispatch_table = table

        def __init__(self, file: io.BytesIO, persistent: Callable[[Any], Any]) -> None:
            super().__init__(file, protocol=PROTOCOL)
            self._persistent = persistent

        def persistent_id(self, obj: Any) -> Any:
            return self._persistent(obj)

    return ByValue, WithTokens


def dumps(obj: Any, base: type[pickle.Pickler] = pickle.Pickler) -> bytes:
    """``obj`` pickled with tensors as raw bytes."""
    buf = io.BytesIO()
    _picklers(base)[0](buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()


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


# --- the worker's side ------------------------------------------------------------------------


@dataclass
class Reply:
    chunk_id: int
    results: list[tuple[int, Any]]
    failed: int | None = None
    error: bytes = b""
    remote_traceback: str = ""
    fatal: str = ""
    """The worker could not read the message or the function: its state is no longer known."""


class Worker:
    """Runs the messages an :class:`Encoder` builds and replies with the results."""

    def __init__(self, base: type[pickle.Pickler] = pickle.Pickler) -> None:
        self.base = base
        self._by_value = _picklers(base)[0]
        self._held: dict[int, tuple[Any, int]] = {}
        self._fn: Callable[[Any], Any] | None = None
        self._seq = 0

    def handle(self, message: bytes) -> bytes:
        chunk_id = -1
        try:
            (seq, chunk_id, evict, fn_blob), chunk = _Unpickler(io.BytesIO(message), self).load()
            if seq != self._seq:
                raise RuntimeError(f"message {seq} arrived when {self._seq} was expected")
            self._seq += 1
            for token in evict:
                self._held.pop(token, None)
            if fn_blob is not None:
                self._fn = None
                self._fn = pickle.loads(fn_blob)
        except Exception as exc:
            return self._dump(Reply(chunk_id, [], fatal=_describe(exc)))
        fn = self._fn
        assert fn is not None, "the first message to a worker carries the function"
        results: list[tuple[int, Any]] = []
        for index, task in chunk:
            try:
                results.append((index, fn(task)))
            except Exception as exc:
                blob, tb = _exception(exc)
                return self._dump(Reply(chunk_id, results, index, blob, tb))
        return self._dump(Reply(chunk_id, results))

    def _dump(self, reply: Reply) -> bytes:
        buf = io.BytesIO()
        try:
            self._by_value(buf, protocol=PROTOCOL).dump(reply)
        except Exception as exc:  # a result that does not pickle: name the task
            for i, (index, result) in enumerate(reply.results):
                try:
                    self._by_value(io.BytesIO(), protocol=PROTOCOL).dump(result)
                except Exception:
                    why = TypeError(f"the result of task {index} does not pickle: {exc}")
                    blob, tb = _exception(why)
                    return self._dump(Reply(reply.chunk_id, reply.results[:i], index, blob, tb))
            raise
        return buf.getvalue()

    def load(self, pid: Any) -> Any:
        if pid[0] == "new":
            obj = pid[2]
            self._held[pid[1]] = (obj, obj._version if isinstance(obj, Tensor) else 0)
            return obj
        obj, version = self._held[pid[1]]
        if isinstance(obj, Tensor) and obj._version != version:
            raise RuntimeError(
                "a task modified one of its input tensors in place; inputs are shared between "
                "the tasks a worker runs, as they are between rounds in the caller, so a task "
                "must not write to them"
            )
        return obj


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, worker: Worker) -> None:
        super().__init__(file)
        self._worker = worker

    def persistent_load(self, pid: Any) -> Any:
        return self._worker.load(pid)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _exception(exc: BaseException) -> tuple[bytes, str]:
    """``exc`` pickled (or, if it does not survive pickling, a RuntimeError with its text) and
    its formatted traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = pickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(blob)
    except Exception:
        blob = pickle.dumps(RuntimeError(_describe(exc)), protocol=PROTOCOL)
    return blob, tb


def worker_settings() -> dict[str, Any]:
    """The caller's torch settings that change numerics, for its workers to copy."""
    return {
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def prepare_worker(threads: int, settings: dict[str, Any]) -> None:
    """Set a worker's torch threads and copy the caller's numerics settings."""
    torch.set_num_threads(threads)
    torch.set_default_dtype(settings["default_dtype"])
    torch.use_deterministic_algorithms(
        settings["deterministic"], warn_only=settings["deterministic_warn_only"]
    )
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- scheduling -------------------------------------------------------------------------------


class Channel(Protocol):
    """Carries messages to ``workers`` workers and their replies back."""

    workers: int

    def send(self, worker: int, message: bytes) -> None:
        """Queue ``message`` for ``worker``; raise :class:`_Lost` if it is gone."""

    def receive(self) -> tuple[int, bytes]:
        """The next reply of any worker with work in flight; raise :class:`_Lost` if one died."""


class Fatal(Exception):
    """A worker could not read its message; its state is unknown, so the workers must go."""


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


def _lost_error(
    lost: _Lost, inflight: dict[int, tuple[int, range]], extra: range = range(0)
) -> WorkerLost:
    held = sorted(
        {i for w, chunk in inflight.values() if w == lost.worker for i in chunk} | set(extra)
    )
    shown = ", ".join(map(str, held[:10])) + (f" … ({len(held)} in all)" if len(held) > 10 else "")
    doing = f" while it held the tasks at indices {shown} of this map" if held else ""
    detail = f"\n{lost.detail}" if lost.detail else ""
    return WorkerLost(
        f"{lost.why}{doing}. The runtime's workers were stopped; the next map starts new "
        f"ones.{detail}"
    )
