"""The worker's side of the transport: run the messages an ``Encoder`` builds, reply with results.

A :class:`Worker` holds the inputs sent to it by token (checking that no task modifies one in
place), the function of the map, and the sequence number of the next message; it runs a chunk
of tasks and replies with a :class:`Reply` (the results, or the first task's error). The
helpers here set up a worker process: its torch threads and the caller's numerics settings
(:func:`worker_settings`, :func:`prepare_worker`), and how many CPUs this process may use.
Used by :mod:`.pool` (worker processes) and :mod:`.ray` (actors).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedtransfer.runtime.failures import _describe, _exception
from fedtransfer.runtime.pickling import PROTOCOL, _picklers


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
    """Runs the messages an :class:`~fedtransfer.runtime.transport.Encoder` builds and replies
    with the results."""

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
