"""The fast runtimes themselves, FL-free: batches go to a function that declares it takes
them (a ``Batched``), in chunks and in task order; anything else runs one by one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from fedtransfer import ConfigError, Runtime
from fedtransfer.client.fast.runtimes import Batched, batched_map
from fedtransfer.runtime import AutoRuntime, VectorizedRuntime


@dataclass
class Batcher(Batched[int, int]):
    """A function that takes batches and records the batches and the limits it is given."""

    accept: bool = True
    seen: list[list[int]] = field(default_factory=list)
    hints: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, x: int) -> int:
        return x * 10

    def batch(
        self, xs: Sequence[int], *, max_params: int | None = None, convolutions: bool = True
    ) -> list[int] | None:
        self.seen.append(list(xs))
        self.hints.append({"max_params": max_params, "convolutions": convolutions})
        return [x * 10 for x in xs] if self.accept else None


def test_vectorized_runtime_is_a_runtime_and_its_repr_is_its_config() -> None:
    assert isinstance(VectorizedRuntime(), Runtime)
    assert isinstance(AutoRuntime(), Runtime)
    assert repr(VectorizedRuntime(chunk=8)) == "VectorizedRuntime(chunk=8, min_tasks=2)"


def test_vectorized_runtime_batches_in_chunks_in_task_order() -> None:
    fn = Batcher()
    assert VectorizedRuntime(chunk=2).map(fn, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert fn.seen == [[1, 2], [3, 4]]  # the last chunk of one is under min_tasks: one by one
    assert fn.hints == [{"max_params": None, "convolutions": True}] * 2  # no limits


def test_vectorized_runtime_runs_tasks_one_by_one_when_batch_declines() -> None:
    fn = Batcher(accept=False)
    assert VectorizedRuntime().map(fn, [1, 2, 3]) == [10, 20, 30]
    assert fn.seen == [[1, 2, 3]]


def test_vectorized_runtime_without_batch_or_with_too_few_tasks_maps_one_by_one() -> None:
    assert VectorizedRuntime().map(lambda x: x + 1, [1, 2]) == [2, 3]
    fn = Batcher()
    assert VectorizedRuntime(min_tasks=4).map(fn, [1, 2, 3]) == [10, 20, 30]
    assert fn.seen == []
    assert VectorizedRuntime().map(fn, []) == []


def test_a_batch_method_alone_does_not_make_a_function_batched() -> None:
    """No duck typing: a function that merely has a ``batch`` method runs one by one."""

    class Lookalike:
        def __call__(self, x: int) -> int:
            return x + 1

        def batch(self, xs: Sequence[int], **hints: Any) -> list[int]:
            raise AssertionError("batch must not be called on a function that is not Batched")

    assert not isinstance(Lookalike(), Batched)
    assert VectorizedRuntime().map(Lookalike(), [1, 2, 3]) == [2, 3, 4]
    assert AutoRuntime().map(Lookalike(), [1, 2]) == [2, 3]


def test_auto_runtime_passes_its_limits_to_batch() -> None:
    fn = Batcher()
    assert AutoRuntime(max_params=123).map(fn, [1, 2]) == [10, 20]
    assert fn.hints == [{"max_params": 123, "convolutions": False}]


def test_batched_map_rejects_a_batch_of_the_wrong_length() -> None:
    class Short(Batcher):
        def batch(
            self, xs: Sequence[int], *, max_params: int | None = None, convolutions: bool = True
        ) -> list[int] | None:
            return [1]

    with pytest.raises(RuntimeError, match="returned 1 results for 3 tasks"):
        batched_map(Short(), [1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk": 0}, "chunk must be an integer >= 1 or None, got 0"),
        ({"chunk": True}, "chunk must be"),
        ({"min_tasks": 0}, "min_tasks must be an integer >= 1, got 0"),
    ],
)
def test_vectorized_runtime_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        VectorizedRuntime(**kwargs)
    with pytest.raises(ConfigError, match=match):
        AutoRuntime(**kwargs)


def test_auto_runtime_rejects_a_non_integer_size_limit() -> None:
    with pytest.raises(ConfigError, match=r"max_params must be an integer, got 1\.5"):
        AutoRuntime(max_params=1.5)  # type: ignore[arg-type]


def test_the_old_import_paths_still_resolve_to_the_new_homes() -> None:
    import fedtransfer.client.features as old_features
    import fedtransfer.client.vectorized as old_vectorized
    import fedtransfer.runtime.vectorized as old_runtimes
    from fedtransfer.client.fast import features, runtimes, vectorized

    assert old_runtimes.VectorizedRuntime is runtimes.VectorizedRuntime
    assert old_runtimes.AutoRuntime is runtimes.AutoRuntime
    assert old_runtimes.batched_map is runtimes.batched_map
    assert old_vectorized.vectorized_update is vectorized.vectorized_update
    assert old_features.train_head_cached is features.train_head_cached
    assert old_features.no_feature_cache is features.no_feature_cache
