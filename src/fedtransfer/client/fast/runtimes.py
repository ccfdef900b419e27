"""``VectorizedRuntime`` and ``AutoRuntime``: hand whole batches of tasks to a function that
declares it runs them at once (a :class:`Batched`, as a round's
:class:`~fedtransfer.client.job.ClientUpdate` is), else run them one by one. They are held
to the runtime contract (``tests/contracts/test_runtimes.py``) within
:data:`~fedtransfer.client.fast.TOLERANCE`; :mod:`fedtransfer.runtime` exports them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from fedtransfer.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


class Batched(ABC, Generic[T_contra, R_co]):
    """A function of one task that also runs a batch of tasks at once, declared by subclassing
    (nothing is inferred from the methods a function happens to have): the fast runtimes call
    ``batch`` and, where it declines (returns ``None``), the function task by task."""

    @abstractmethod
    def __call__(self, task: T_contra) -> R_co:
        """One task's result."""

    @abstractmethod
    def batch(
        self,
        tasks: Sequence[T_contra],
        *,
        max_params: int | None = None,
        convolutions: bool = True,
    ) -> Sequence[R_co] | None:
        """Every task's result, in task order, or ``None`` to decline (past ``max_params``
        trainable scalars, or with a training convolution and ``convolutions=False``, it
        should: ``AutoRuntime``'s limits)."""


MAX_PARAMS = 64_000
""":class:`AutoRuntime`'s default size limit, in trainable parameters (see its rule)."""


@dataclass(frozen=True)
class VectorizedRuntime:
    """Runs tasks in batches through ``fn.batch(tasks)`` when ``fn`` is :class:`Batched` (a
    round's :class:`~fedtransfer.client.job.ClientUpdate` is: the whole cohort trains at once
    on stacked parameters with ``torch.func``), ``chunk`` tasks at a time (all at once when
    ``None``), and only when there are at least ``min_tasks``. Where ``fn`` is not, or
    ``batch`` declines (an objective, option or model the vectorised path does not support,
    logged as a warning), the tasks run one by one, exactly as
    :class:`~fedtransfer.runtime.serial.SerialRuntime` runs them. Results match the serial
    runtime's within :data:`~fedtransfer.client.fast.TOLERANCE`, not bit for bit.

    >>> VectorizedRuntime().map(lambda x: x * 2, [1, 2, 3])  # not Batched: one by one
    [2, 4, 6]
    """

    chunk: int | None = None
    min_tasks: int = 2

    def __post_init__(self) -> None:
        _check_sizes(type(self).__name__, self.chunk, self.min_tasks)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        return batched_map(fn, tasks, chunk=self.chunk, min_tasks=self.min_tasks)


@dataclass(frozen=True)
class AutoRuntime:
    """Vectorises only where it pays: :class:`VectorizedRuntime`, except that ``fn.batch`` is
    asked to decline (so the tasks run one by one, as on the serial runtime) models with more
    than ``max_params`` trainable parameters and, unless ``convolutions``, models whose
    convolutions train.

    The rule, measured (``benchmarks/vectorized.py``, 1 torch thread on a 2-core CPU): a
    cohort on stacked parameters turns each layer's many small per-client kernels into one
    batched kernel, which wins while per-call overhead dominates — small models and
    minibatches, like the perf-anchors 25k-parameter MLP — and loses once the stacked
    weights stream through memory (MLPs: 1.1× faster at 76k parameters, slower from about
    100k) or the batched kernel is itself slow: per-client convolution kernels run as one
    grouped convolution, slower than serial for every CNN measured but a 1k-parameter one.
    A convolution that stays frozen is fine (its weights are not stacked).

    >>> AutoRuntime().map(lambda x: x + 1, [1, 2])
    [2, 3]
    """

    max_params: int = MAX_PARAMS
    convolutions: bool = False
    chunk: int | None = None
    min_tasks: int = 2

    def __post_init__(self) -> None:
        _check_sizes(type(self).__name__, self.chunk, self.min_tasks)
        if isinstance(self.max_params, bool) or not isinstance(self.max_params, int):
            raise ConfigError(
                f"AutoRuntime: max_params must be an integer, got {self.max_params!r}"
            )

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        return batched_map(
            fn,
            tasks,
            chunk=self.chunk,
            min_tasks=self.min_tasks,
            max_params=self.max_params,
            convolutions=self.convolutions,
        )


def batched_map(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    *,
    chunk: int | None = None,
    min_tasks: int = 2,
    max_params: int | None = None,
    convolutions: bool = True,
) -> list[R]:
    """``[fn(t) for t in tasks]``, computed ``chunk`` tasks at a time by ``fn.batch(tasks,
    max_params=…, convolutions=…)`` where ``fn`` is :class:`Batched` and it accepts them (a
    chunk it declines with ``None``, or one under ``min_tasks``, runs one by one)."""
    if not isinstance(fn, Batched) or len(tasks) < min_tasks:
        return [fn(t) for t in tasks]
    size = chunk or len(tasks)
    results: list[R] = []
    for i in range(0, len(tasks), size):
        part = tasks[i : i + size]
        out: Sequence[R] | None = None
        if len(part) >= min_tasks:
            out = fn.batch(part, max_params=max_params, convolutions=convolutions)
        if out is None:
            out = [fn(t) for t in part]
        elif len(out) != len(part):
            raise RuntimeError(
                f"{fn!r}.batch returned {len(out)} results for {len(part)} tasks; expected one "
                "per task, in task order"
            )
        results.extend(out)
    return results


def _check_sizes(owner: str, chunk: int | None, min_tasks: int) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"{owner}: chunk must be an integer >= 1 or None, got {chunk!r}")
    if isinstance(min_tasks, bool) or not isinstance(min_tasks, int) or min_tasks < 1:
        raise ConfigError(f"{owner}: min_tasks must be an integer >= 1, got {min_tasks!r}")
