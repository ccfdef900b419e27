"""``VectorizedRuntime`` and ``AutoRuntime``: hand whole batches of tasks to a function that can
run them at once (its ``batch`` method), else run them one by one; they know nothing of FL."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fedtransfer.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

MAX_PARAMS = 64_000
""":class:`AutoRuntime`'s default size limit, in trainable parameters (see its rule)."""


@dataclass(frozen=True)
class VectorizedRuntime:
    """Runs tasks in batches through ``fn.batch(tasks)`` when ``fn`` has one (a round's
    :class:`~fedtransfer.client.job.ClientUpdate` does: the whole cohort trains at once on
    stacked parameters with ``torch.func``), ``chunk`` tasks at a time (all at once when
    ``None``), and only when there are at least ``min_tasks``. Where ``fn`` has no ``batch``
    or it returns ``None`` (it declines: an unsupported objective or model …), the tasks run
    one by one, exactly as :class:`~fedtransfer.runtime.serial.SerialRuntime` runs them.
    Results match the serial runtime's up to float rounding (1e-5), not bit for bit.

    >>> VectorizedRuntime().map(lambda x: x * 2, [1, 2, 3])  # no batch method: one by one
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
        hints = {"max_params": self.max_params, "convolutions": self.convolutions}
        return batched_map(fn, tasks, chunk=self.chunk, min_tasks=self.min_tasks, hints=hints)


def batched_map(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    *,
    chunk: int | None = None,
    min_tasks: int = 2,
    hints: Mapping[str, object] | None = None,
) -> list[R]:
    """``[fn(t) for t in tasks]``, computed ``chunk`` tasks at a time by ``fn.batch(tasks,
    **hints)`` where ``fn`` has that method and it accepts them (a chunk it declines with
    ``None``, or one under ``min_tasks``, runs one by one)."""
    batch: Any = getattr(fn, "batch", None)
    if not callable(batch) or len(tasks) < min_tasks:
        return [fn(t) for t in tasks]
    size = chunk or len(tasks)
    results: list[R] = []
    for i in range(0, len(tasks), size):
        part = tasks[i : i + size]
        out = batch(part, **(hints or {})) if len(part) >= min_tasks else None
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
