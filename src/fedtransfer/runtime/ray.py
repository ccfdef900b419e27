"""``RayRuntime``: run tasks on Ray actors that live across maps, locally or on a cluster.

Ray is an optional dependency (``pip install "fedtransfer[ray]"``); this module imports it only
when a runtime is made, so ``import fedtransfer`` never needs it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import torch

from fedtransfer.errors import ConfigError
from fedtransfer.runtime.failures import Fatal, _Lost
from fedtransfer.runtime.transport import Encoder, Traffic, run_map
from fedtransfer.runtime.worker import Worker, prepare_worker, usable_cpus, worker_settings

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

INSTALL_HINT = 'RayRuntime needs Ray: pip install "fedtransfer[ray]"'


def import_ray() -> ModuleType:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return ray


@dataclass(frozen=True)
class RayRuntime:
    """Runs tasks on ``num_actors`` Ray actors that live across maps (and rounds).

    Each actor builds what it caches once (``worker_model`` keeps the prepared model per
    process), so keeping the actors alive is what makes later rounds cheap. With ``address``
    None and Ray not yet initialised, a private local Ray instance is started on the loopback
    interface with ``num_actors × num_cpus_per_actor`` CPUs, no dashboard, no usage statistics
    and worker logs kept out of this process; :meth:`shutdown` (or leaving a ``with`` block)
    kills the actors and stops that instance. With an ``address`` (``"auto"``,
    ``"ray://host:10001"`` …) it connects to that cluster, whose nodes need fedtransfer
    installed. If Ray is already initialised, that instance is used as it is.

    ``num_actors`` defaults to the usable CPUs divided by ``threads`` locally, and to the
    cluster's CPUs divided by ``num_cpus_per_actor`` on a cluster. Each actor runs torch on
    ``threads`` intra-op threads (default: the caller's ``torch.get_num_threads()`` when the
    runtime is made) and copies the caller's numerics settings, so results are bit-identical to
    :class:`SerialRuntime` at the same thread count. Tasks travel as in
    :class:`~fedtransfer.runtime.pool.ProcessRuntime` (big inputs once per actor), pickled with
    Ray's cloudpickle, so lambdas work too. A task's exception is re-raised here with its
    message; an actor that dies raises :class:`~fedtransfer.runtime.failures.WorkerLost` and
    the next map starts new actors.
    """

    address: str | None = None
    num_actors: int | None = None
    _: KW_ONLY
    num_cpus_per_actor: float = 1
    threads: int | None = None
    _state: _State = field(default_factory=lambda: _State(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import_ray()
        threads = torch.get_num_threads() if self.threads is None else self.threads
        if threads < 1:
            raise ConfigError(f"RayRuntime: threads must be >= 1, got {threads}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"RayRuntime: num_actors must be >= 1, got {self.num_actors}")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError(
                f"RayRuntime: num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor}"
            )
        object.__setattr__(self, "threads", threads)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]`` on the actors, in task order."""
        tasks = list(tasks)
        if not tasks:
            return []
        with self._state.lock:
            actors = self._actors()
            try:
                blob = actors.encoder.function(fn)
            except Exception as exc:
                raise ConfigError(f"RayRuntime: cannot send {fn!r} to the actors: {exc}") from exc
            try:
                results, error = run_map(actors, actors.encoder, blob, tasks)
            except Fatal as exc:
                self._stop_actors()
                raise ConfigError(
                    f"RayRuntime: an actor could not load what it was sent: {exc}. Actors "
                    "import the function's and the tasks' modules by name: they must be "
                    "importable on every node"
                ) from None
            except BaseException:
                self._stop_actors()
                raise
            if error is not None:
                raise error
            return results

    def shutdown(self) -> None:
        """Kill the actors and stop the Ray instance this runtime started (if it did)."""
        with self._state.lock:
            self._stop_actors()
            if self._state.owns_ray:
                import_ray().shutdown()
                self._state.owns_ray = False

    def traffic(self) -> Traffic:
        """Bytes sent to and received from the current actors."""
        actors = self._state.actors
        return Traffic() if actors is None else actors.encoder.traffic

    def __enter__(self) -> RayRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __reduce__(self) -> tuple[Any, ...]:  # the configuration, not the actors
        cls, cpus, threads = type(self), self.num_cpus_per_actor, self.threads
        rebuild = functools.partial(cls, num_cpus_per_actor=cpus, threads=threads)
        return rebuild, (self.address, self.num_actors)

    def _actors(self) -> _Actors:
        state = self._state
        if state.actors is None:
            ray = import_ray()
            if not ray.is_initialized():
                self._init(ray)
            assert self.threads is not None
            count = self.num_actors or self._default_actors(ray)
            state.actors = _Actors(ray, count, self.num_cpus_per_actor, self.threads)
        return state.actors

    def _default_actors(self, ray: ModuleType) -> int:
        assert self.threads is not None
        if self._state.owns_ray and self.address is None:
            return max(1, usable_cpus() // self.threads)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        return max(1, int(cpus // self.num_cpus_per_actor))

    def _init(self, ray: ModuleType) -> None:
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if self.address is not None:
            options["address"] = self.address
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
                ray.init(**options)
            self._state.owns_ray = True
            return
        assert self.threads is not None
        count = self.num_actors or max(1, usable_cpus() // self.threads)
        options["num_cpus"] = math.ceil(count * self.num_cpus_per_actor)
        with _local_only(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            ray.init(**options)
        self._state.owns_ray = True

    def _stop_actors(self) -> None:
        actors, self._state.actors = self._state.actors, None
        if actors is not None:
            actors.kill()


@contextmanager
def _local_only() -> Iterator[None]:
    """Start a single-machine Ray instance with every service on the loopback interface and no
    usage statistics: what Ray does on macOS and Windows, where it runs local-only (it otherwise
    listens on all interfaces, for other nodes to join)."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the processes Ray starts
    constants: Any = None
    try:
        from ray._private import ray_constants  # for this process, which imported Ray already

        before, constants = ray_constants.ENABLE_RAY_CLUSTER, ray_constants
    except (ImportError, AttributeError):  # another Ray layout: the environment must do
        log.warning("RayRuntime: cannot keep this Ray version's services on loopback")
    try:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = False
        yield
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = before
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(eq=False)
class _State:
    actors: _Actors | None = None
    owns_ray: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


class _Actors:
    """The actors and the references in flight; a :class:`Channel` for run_map."""

    def __init__(self, ray: ModuleType, count: int, num_cpus: float, threads: int) -> None:
        from ray import cloudpickle

        self.ray = ray
        self.workers = count
        self.encoder = Encoder(count, cloudpickle.CloudPickler)
        remote = ray.remote(num_cpus=num_cpus, max_restarts=0, max_task_retries=0)(_Actor)
        settings = worker_settings()
        self.actors = [remote.remote(threads, settings) for _ in range(count)]
        self.pending: dict[Any, int] = {}
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"RayRuntime: the actors did not start: {exc}") from exc

    def send(self, worker: int, message: bytes) -> None:
        self.pending[self.actors[worker].run.remote(message)] = worker

    def receive(self) -> tuple[int, bytes]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        worker = self.pending.pop(ready[0])
        try:
            return worker, self.ray.get(ready[0])
        except self.ray.exceptions.RayError as exc:
            raise _Lost(worker, f"Ray actor {worker} died", f"Ray says: {exc}") from None

    def kill(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone, or Ray is shutting down
                log.debug("RayRuntime: could not kill an actor", exc_info=True)
        self.actors, self.pending = [], {}


class _Actor:
    """One Ray actor: a :class:`~fedtransfer.runtime.worker.Worker` in its own process."""

    def __init__(self, threads: int, settings: dict[str, Any]) -> None:
        from ray import cloudpickle

        prepare_worker(threads, settings)
        self.worker = Worker(cloudpickle.CloudPickler)

    def ready(self) -> int:
        return os.getpid()

    def run(self, message: bytes) -> bytes:
        return self.worker.handle(message)
