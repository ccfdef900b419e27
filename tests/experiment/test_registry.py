"""The registry's runtimes: a name becomes its runtime, an unknown name is a clear error."""

from __future__ import annotations

import pytest

from fedtransfer.errors import ConfigError
from fedtransfer.experiment import registry
from fedtransfer.runtime import AutoRuntime, ProcessRuntime, SerialRuntime, VectorizedRuntime


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("serial", SerialRuntime),
        ("vectorized", VectorizedRuntime),
        ("auto", AutoRuntime),
        ("process", ProcessRuntime),
    ],
)
def test_registry_runtime_builds_the_named_runtime(name: str, kind: type) -> None:
    with registry.runtime(name) as runtime:
        assert type(runtime) is kind
    assert registry.RUNTIMES[name] is kind


def test_registry_runtime_sizes_a_pool_with_workers_and_threads() -> None:
    with registry.runtime("process", workers=3, threads=1) as pool:  # starts on the first map
        assert isinstance(pool, ProcessRuntime) and (pool.workers, pool.threads) == (3, 1)


def test_registry_runtime_of_an_unknown_name_names_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught, registry.runtime("vectorised"):
        pass
    message = str(caught.value)
    assert "'vectorised'" in message
    for name in ("serial", "process", "ray", "vectorized", "auto"):
        assert f"'{name}'" in message
    assert "hint: did you mean 'vectorized'?" in message


def test_registry_runtime_in_process_takes_no_workers() -> None:
    match = r"'serial'.*workers=2.*\['process', 'ray'\]"
    with pytest.raises(ConfigError, match=match), registry.runtime("serial", workers=2):
        pass
    assert registry.POOLED_RUNTIMES == ("process", "ray")
