"""Participation in simulated synchronous rounds: seeded dropout, stragglers past a deadline,
and ``min_responses``; every surviving update is aggregated and none is lost."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_model

from fedtransfer import LocalTraining, Recipe, ServerState, run_round, tree
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.rounds.participation import ClientDelays, Participation
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients, UpdateLimits
from fedtransfer.transfer import Full

pytestmark = pytest.mark.usefixtures("single_thread")


def _population(n: int = 10) -> FederatedDataset:
    gen = torch.Generator().manual_seed(0)
    train, test = {}, {}
    for i in range(n):
        x = torch.randn(20, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (20,), generator=gen)
        train[f"c{i}"], test[f"c{i}"] = TensorData(x[:16], y[:16]), TensorData(x[16:], y[16:])
    return FederatedDataset(train, test, 3)


def _recipe(**changes: object) -> Recipe:
    return Recipe(
        policy=Full(),
        training=LocalTraining(lr=0.05, steps=1, batch_size=8),
        sampler=AllClients(),
        **changes,  # type: ignore[arg-type]
    )


def test_half_dropout_for_50_rounds_completes_every_round_and_loses_no_update() -> None:
    data, recipe = _population(), _recipe()
    participation = Participation(dropout=0.5)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    accepted_total, up = 0, 0
    for r in range(1, 51):
        absent = participation.absent(list(data.clients), seed=0, round=r)
        state, report = run_round(
            recipe,
            state,
            data,
            SerialRuntime(),
            model_fn=make_tiny_model,
            participation=participation,
        )
        assert report.round == r
        # every client that took part is aggregated; every one that did not is named
        assert set(report.accepted) == set(data.clients) - set(absent)
        assert {c for c, _ in report.rejected} == set(absent)
        assert all("dropped out" in why for _, why in report.rejected)
        assert report.metrics["participation/dropped"] == len(absent)
        accepted_total += len(report.accepted)
        up += report.bytes_up
    assert state.round == 50
    assert state.ledger["up"] == up  # every surviving update's bytes counted, none lost
    assert 0.4 * 500 < accepted_total < 0.6 * 500


def test_dropout_is_seeded_per_round_and_client() -> None:
    p = Participation(dropout=0.5)
    clients = [f"c{i}" for i in range(200)]
    first = p.absent(clients, seed=3, round=7)
    assert first == p.absent(clients, seed=3, round=7)
    assert first != p.absent(clients, seed=3, round=8)
    assert 60 < len(first) < 140


def test_a_straggler_past_the_deadline_is_not_waited_for() -> None:
    p = Participation(delays=ClientDelays(mean=1.0, spread=1.0), deadline=1.5)
    data, recipe = _population(), _recipe()
    late = p.absent(list(data.clients), seed=0, round=1)
    assert late and all(why.startswith("late") for why in late.values())
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    new, report = run_round(
        recipe, state, data, SerialRuntime(), model_fn=make_tiny_model, participation=p
    )
    assert set(report.accepted) == set(data.clients) - set(late)
    assert report.metrics["participation/late"] == len(late)
    assert all(c not in new.distribution.set_up for c in late)  # never got their set-up


def test_a_round_with_fewer_than_min_responses_leaves_the_model_unchanged() -> None:
    data = _population(4)
    recipe = _recipe(limits=UpdateLimits(min_responses=5))
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    new, report = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
    assert tree.equal(new.params, state.params) and new.round == 1
    assert not report.accepted and len(report.rejected) == 4
    assert all("fewer than min_responses = 5" in why for _, why in report.rejected)
    assert report.metrics["server/too_few_responses"] == 1.0
    assert not new.holdings.local


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 1.0}, "dropout must be in"),
        ({"deadline": 2.0}, "a deadline needs client delays"),
        ({"delays": ClientDelays(), "deadline": 0.0}, "deadline must be finite"),
    ],
)
def test_participation_refuses_impossible_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Participation(**kwargs)  # type: ignore[arg-type]


def test_participation_is_a_setting_of_the_experiment() -> None:
    from fedtransfer.experiment.run import load_config

    cfg = load_config(
        None, ["participation={dropout: 0.3, delays: {mean: 1.0, spread: 0.5}, deadline: 2.0}"]
    )
    assert cfg.participation == Participation(0.3, ClientDelays(1.0, 0.5), 2.0)
