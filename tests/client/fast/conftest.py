"""Fixtures of the fast-path tests: a spy on the vectorised and per-client paths, and a fresh
record of the declines already logged (each is a warning once per run: every test is a run)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.client.fast.cohorts import Spy

import fedtransfer.client.fast.vectorized as vectorized_module
import fedtransfer.client.update as update_module
from fedtransfer import Reply


@pytest.fixture(autouse=True)
def fresh_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the declines logged by earlier tests (their runs share seeds and weights)."""
    monkeypatch.setattr(vectorized_module, "_WARNED", vectorized_module._Once())


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    """Counts the vectorised calls that trained and that declined, and the clients run one by
    one through ``client_update``."""
    seen = Spy()
    vectorized_update = vectorized_module.vectorized_update
    client_update = update_module.client_update

    def counting_batch(*args: Any, **kwargs: Any) -> list[Reply] | None:
        out = vectorized_update(*args, **kwargs)
        if out is None:
            seen.declined += 1
        else:
            seen.batched += 1
        return out

    def counting_client(*args: Any, **kwargs: Any) -> Reply:
        seen.serial += 1
        return client_update(*args, **kwargs)

    monkeypatch.setattr(vectorized_module, "vectorized_update", counting_batch)
    monkeypatch.setattr(update_module, "client_update", counting_client)
    yield seen
