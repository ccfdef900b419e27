"""One model per worker, reused across clients: the same results as a fresh model per client."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.conftest import make_tiny_data, make_tiny_model
from torch import nn

from fedtransfer import LocalTraining, Objective, Recipe, ServerState, run_round, tree
from fedtransfer.client import Ditto, Plain, Rep, Scaffold
from fedtransfer.client.update import worker_model
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full, HeadOnly, Lora
from fedtransfer.transfer.policies import PersonalHead

pytestmark = pytest.mark.usefixtures("single_thread")


class Unhashable:
    """A model factory the worker cannot key a cache on: every client gets a fresh model."""

    __hash__ = None  # type: ignore[assignment]

    def __call__(self) -> nn.Module:
        return make_tiny_model()


def test_worker_model_is_built_once_per_policy_and_factory() -> None:
    a, plan = worker_model(Full(), make_tiny_model)
    b, _ = worker_model(Full(), make_tiny_model)
    c, other = worker_model(HeadOnly(), make_tiny_model)
    assert a is b and a is not c
    assert plan.shared != other.shared


def test_worker_model_keeps_only_the_latest_few() -> None:
    first, _ = worker_model(Lora(rank=1, seed=1), make_tiny_model)
    for seed in range(2, 8):
        worker_model(Lora(rank=1, seed=seed), make_tiny_model)
    again, _ = worker_model(Lora(rank=1, seed=1), make_tiny_model)
    assert again is not first


def test_worker_model_unhashable_factory_gets_a_fresh_model() -> None:
    factory = Unhashable()
    assert worker_model(Full(), factory)[0] is not worker_model(Full(), factory)[0]


def _rounds(recipe: Recipe, model_fn: Callable[[], nn.Module], n: int = 3) -> list[bytes]:
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    data, hashes = make_tiny_data(), []
    runtime = SerialRuntime()
    for _ in range(n):
        state, _ = run_round(recipe, state, data, runtime, model_fn=model_fn)
        hashes.append(tree.sha256(state.params).encode())
    return hashes


@pytest.mark.parametrize(
    ("policy", "objective"),
    [
        (Full(), Plain()),
        (Full(), Scaffold()),
        (Full(), Ditto(lam=0.1)),
        (PersonalHead(), Rep(head_epochs=1)),
        (Lora(rank=2, train=("head",)), Plain()),
    ],
    ids=["plain", "scaffold", "ditto", "rep", "lora"],
)
def test_round_with_a_reused_model_equals_fresh_models(
    policy: object, objective: Objective
) -> None:
    recipe = Recipe(
        policy=policy,  # type: ignore[arg-type]
        objective=objective,
        training=LocalTraining(lr=0.05, steps=3, batch_size=8),
        sampler=AllClients(),
    )
    assert _rounds(recipe, make_tiny_model) == _rounds(recipe, Unhashable())
