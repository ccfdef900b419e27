"""``SerialRuntime``: run client tasks one after another in this process (the reference)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Runtime(Protocol):
    """Maps a function over tasks and returns results in task order; knows nothing of FL."""

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        """``[fn(t) for t in tasks]``, however it is scheduled."""


@dataclass(frozen=True)
class SerialRuntime:
    """The reference runtime: every other runtime must reproduce its results on CPU.

    >>> SerialRuntime().map(lambda x: x * 2, [1, 2, 3])
    [2, 4, 6]
    """

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        return [fn(t) for t in tasks]
