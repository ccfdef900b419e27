"""``ProcessRuntime``: run tasks on a persistent pool of worker processes on this machine."""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import queue
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal, TypeVar

import torch

from fedtransfer.errors import ConfigError
from fedtransfer.runtime.failures import Fatal, _Lost
from fedtransfer.runtime.transport import Encoder, Traffic, run_map
from fedtransfer.runtime.worker import Worker, prepare_worker, usable_cpus, worker_settings

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

StartMethod = Literal["spawn", "forkserver", "fork"]

_READY = b"ready"
_STOP_SECONDS = 5.0


@dataclass(frozen=True)
class ProcessRuntime:
    """Runs tasks on ``workers`` worker processes that live across maps (and rounds).

    The pool starts on the first :meth:`map` and is reused by every later one; :meth:`close` (or
    leaving a ``with`` block, or the end of the interpreter) stops it. Each worker runs torch on
    ``threads`` intra-op threads — by default the caller's ``torch.get_num_threads()`` when the
    runtime is made — and copies the caller's default dtype, deterministic-algorithms flag and
    float32 matmul precision, so results are bit-identical to :class:`SerialRuntime` run at the
    same thread count. ``workers`` defaults to the usable CPUs divided by ``threads``; for
    speed on a few cores use ``threads=1`` (and run the serial reference at one thread).

    The function and the tasks are pickled, so the function must be a class instance or a
    module-level function (for ``run_round``: ``model_fn`` too). Big input tensors (a client's
    data, frozen weights) go to each worker once and are referenced afterwards while the caller
    keeps them unchanged (see :mod:`fedtransfer.runtime.transport`); a worker holds a copy of
    each such input it has received while the caller keeps it (at most the whole population's
    data per worker). A task's exception is
    re-raised here with its message (its remote traceback as the cause); a worker that dies
    raises :class:`~fedtransfer.runtime.failures.WorkerLost` and the next map starts afresh.

    The default start method is ``spawn``: robust with torch's thread pools (``fork`` after
    torch has started threads can deadlock); a script that uses it must start its runs under
    ``if __name__ == "__main__":``.

    >>> ProcessRuntime(workers=2, threads=1)
    ProcessRuntime(workers=2, threads=1, start_method='spawn')
    """

    workers: int | None = None
    threads: int | None = None
    _: KW_ONLY
    start_method: StartMethod = "spawn"
    _state: _State = field(default_factory=lambda: _State(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        threads = torch.get_num_threads() if self.threads is None else self.threads
        if threads < 1:
            raise ConfigError(f"ProcessRuntime: threads must be >= 1, got {threads}")
        workers = max(1, usable_cpus() // threads) if self.workers is None else self.workers
        if workers < 1:
            raise ConfigError(f"ProcessRuntime: workers must be >= 1, got {workers}")
        if self.start_method not in mp.get_all_start_methods():
            raise ConfigError(
                f"ProcessRuntime: start_method {self.start_method!r} is not available here; "
                f"choose one of {mp.get_all_start_methods()}"
            )
        object.__setattr__(self, "threads", threads)
        object.__setattr__(self, "workers", workers)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]`` on the worker processes, in task order."""
        tasks = list(tasks)
        if not tasks:
            return []
        with self._state.lock:
            pool = self._pool()
            try:
                blob = pool.encoder.function(fn)
            except Exception as exc:
                raise ConfigError(
                    f"ProcessRuntime: cannot send {fn!r} to worker processes: {exc}. Worker "
                    "processes receive the function by pickling: make it (and, for run_round, "
                    "model_fn) a class instance or a module-level function, not a lambda or a "
                    "nested function"
                ) from exc
            try:
                results, error = run_map(pool, pool.encoder, blob, tasks)
            except Fatal as exc:
                self._stop(graceful=False)
                raise ConfigError(
                    f"ProcessRuntime: a worker process could not load what it was sent: {exc}. "
                    "Workers import the function and the classes in the tasks by name: define "
                    "them in a module a new Python process can import (not in an interactive "
                    "session's __main__)"
                ) from None
            except BaseException:
                self._stop(graceful=False)
                raise
            if error is not None:
                raise error
            return results

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`map` starts new ones)."""
        with self._state.lock:
            self._stop()

    def traffic(self) -> Traffic:
        """Bytes sent to and received from the current pool's workers."""
        pool = self._state.pool
        return Traffic() if pool is None else pool.encoder.traffic

    def __enter__(self) -> ProcessRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:  # the configuration, not the workers
        rebuild = functools.partial(type(self), start_method=self.start_method)
        return rebuild, (self.workers, self.threads)

    def _pool(self) -> _Pool:
        state = self._state
        if state.pool is not None and not state.pool.alive():
            log.warning("ProcessRuntime: a worker process died between maps; restarting the pool")
            self._stop(graceful=False)
        if state.pool is None:
            assert self.workers is not None and self.threads is not None
            pool = _Pool(self.workers, self.threads, self.start_method)
            state.pool = pool
            state.finalizer = weakref.finalize(self, pool.close)
        return state.pool

    def _stop(self, graceful: bool = True) -> None:
        state = self._state
        if state.finalizer is not None:
            state.finalizer.detach()
        if state.pool is not None:
            state.pool.close(graceful=graceful)
        state.pool, state.finalizer = None, None


@dataclass(eq=False)
class _State:
    pool: _Pool | None = None
    finalizer: weakref.finalize | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)


class _Pool:
    """The worker processes, each with its own duplex pipe; a :class:`Channel` for run_map."""

    def __init__(self, workers: int, threads: int, start_method: str) -> None:
        ctx = mp.get_context(start_method)
        settings = worker_settings()
        self.workers = workers
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.encoder = Encoder(workers)
        try:
            for i in range(workers):
                ours, theirs = ctx.Pipe(duplex=True)
                proc = ctx.Process(  # type: ignore[attr-defined]
                    target=_serve,
                    args=(theirs, threads, settings),
                    name=f"fedtransfer-worker-{i}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
            self._await_ready()
        except BaseException:
            self.close(graceful=False)
            raise

    def _await_ready(self) -> None:
        waiting = dict(enumerate(self.conns))
        while waiting:
            sentinels = {self.procs[i].sentinel: i for i in waiting}
            for obj in wait([*waiting.values(), *sentinels]):
                i = sentinels[obj] if isinstance(obj, int) else self.conns.index(obj)  # type: ignore[arg-type]
                try:
                    if not isinstance(obj, int) and self.conns[i].recv_bytes() == _READY:
                        waiting.pop(i, None)
                        continue
                except (EOFError, OSError):
                    pass
                raise RuntimeError(
                    f"ProcessRuntime: {self._death(i)} while starting (its traceback, if any, "
                    "is on stderr). With start_method='spawn' a script must start its runs "
                    "under `if __name__ == '__main__':`"
                )

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def send(self, worker: int, message: bytes) -> None:
        try:
            self.conns[worker].send_bytes(message)
        except OSError:
            raise _Lost(worker, self._death(worker)) from None

    def receive(self) -> tuple[int, bytes]:
        index = {id(c): i for i, c in enumerate(self.conns)}
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        ready = wait([*self.conns, *sentinels])
        for obj in ready:
            if not isinstance(obj, int):
                i = index[id(obj)]
                try:
                    return i, self.conns[i].recv_bytes()
                except (EOFError, OSError):
                    raise _Lost(i, self._death(i)) from None
        i = sentinels[ready[0]]  # type: ignore[index]
        raise _Lost(i, self._death(i))

    def _death(self, i: int) -> str:
        proc = self.procs[i]
        proc.join(timeout=1.0)
        code = proc.exitcode
        who = f"worker process {i} (pid {proc.pid})"
        if code is None:
            return f"{who} closed its connection"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = (
                " (SIGKILL often comes from the out-of-memory killer: fewer workers, or fewer "
                "tasks per map, need less memory)"
                if -code == signal.SIGKILL
                else ""
            )
            return f"{who} was killed by {name}{hint}"
        return f"{who} exited with code {code}"

    def close(self, graceful: bool = True) -> None:
        for conn in self.conns:
            conn.close()  # a worker reads end-of-file and exits
        for proc in self.procs:
            proc.join(timeout=_STOP_SECONDS if graceful else 0.1)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []


def _serve(conn: Connection, threads: int, settings: dict[str, Any]) -> None:
    """A worker process: run the messages that arrive, reply to each, stop at end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    prepare_worker(threads, settings)
    worker = Worker()
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read() -> None:  # keep reading while the main thread works: the caller never blocks
        try:
            while True:
                inbox.put(conn.recv_bytes())
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read, name="fedtransfer-inbox", daemon=True).start()
    conn.send_bytes(_READY)
    while (message := inbox.get()) is not None:
        reply = worker.handle(message)
        try:
            conn.send_bytes(reply)
        except OSError:
            break
