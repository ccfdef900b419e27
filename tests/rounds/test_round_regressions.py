"""Round-spine regressions found in review: a client rejected in one round (a garbled uplink)
trains again in the next, and the round's train loss counts only the accepted clients."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from tests.conftest import make_tiny_data, make_tiny_model

from fedtransfer import LocalTraining, Recipe, Reply, ServerState, run_round
from fedtransfer.server import AllClients, ServerPipeline
from fedtransfer.transfer import LocalBatchNorm


class _RejectFirst:
    """Runtime that garbles one client's uplink in round 1 only."""

    def __init__(self, victim: str) -> None:
        self.victim, self.calls = victim, 0

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        self.calls += 1
        out = [fn(t) for t in tasks]
        self.trained = out
        if self.calls == 1:
            out = [
                dataclasses.replace(r, uplink=b"garbage") if r.client == self.victim else r
                for r in out
            ]
        return out


def test_round_client_rejected_in_round_one_with_local_keys_trains_in_round_two():
    data = make_tiny_data()
    recipe = Recipe(
        policy=LocalBatchNorm(),
        training=LocalTraining(steps=2, batch_size=4),
        pipeline=ServerPipeline(),
        sampler=AllClients(),
    )
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    runtime = _RejectFirst("c0")
    state, first = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert [c for c, _ in first.rejected] == ["c0"] and "c0" not in state.holdings.local
    state, second = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert "c0" in second.accepted and not second.rejected


def test_round_train_loss_counts_accepted_clients_only():
    data = make_tiny_data()
    recipe = Recipe(training=LocalTraining(steps=2, batch_size=4), sampler=AllClients())
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    runtime = _RejectFirst("c0")
    _, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    kept = [r.metrics["loss"] for r in runtime.trained if r.client != "c0"]
    assert report.rejected
    assert report.metrics["client/train_loss"] == pytest.approx(sum(kept) / len(kept), rel=1e-12)
