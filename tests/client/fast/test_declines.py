"""What the vectorised path declines, and that it says so: each reason is one warning per run
naming the objective, option or module, and the cohort then runs client by client — exactly
the serial results. What it implements matches the serial loop within the tolerance."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tests.client.fast.cohorts import (
    LOGGER,
    PLAIN_SGD,
    SIZES,
    Spy,
    make_conv_net,
    make_counting_mlp,
    make_data,
    make_dropout_mlp,
    make_mlp,
    make_noisy_mlp,
    max_diff,
    recipe_with,
    run,
)
from tests.conftest import make_tiny_model
from torch import nn

from fedtransfer import LocalTraining, Recipe, Reply, Runtime, tree
from fedtransfer.client import ClientTask, ClientUpdate, Prox
from fedtransfer.client.fast import TOLERANCE, support
from fedtransfer.client.fast.features import no_feature_cache
from fedtransfer.client.fast.vectorized import vectorized_update
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import AutoRuntime, SerialRuntime, VectorizedRuntime
from fedtransfer.transfer import Full, HeadOnly, ParamPlan

pytestmark = pytest.mark.usefixtures("single_thread")


def declines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The decline warnings logged so far."""
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def assert_declines(
    recipe: Recipe,
    model_fn: Callable[[], nn.Module],
    spy: Spy,
    caplog: pytest.LogCaptureFixture,
    why: Sequence[str],
    runtime: Runtime | None = None,
) -> None:
    """Two rounds on ``runtime`` (default: vectorised) decline every cohort, give exactly the
    serial runtime's state, and log one warning (once per run) that says ``why``."""
    ref, _ = run(recipe, SerialRuntime(), model_fn, rounds=2)
    spy.serial = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got, _ = run(recipe, runtime or VectorizedRuntime(), model_fn, rounds=2)
    assert tree.equal(ref.params, got.params)
    assert ref.holdings.local.keys() == got.holdings.local.keys()
    assert all(tree.equal(ref.holdings.local[c], got.holdings.local[c]) for c in ref.holdings.local)
    assert (spy.batched, spy.declined, spy.serial) == (0, 2, 2 * len(SIZES))
    lines = declines(caplog)
    assert len(lines) == 1, lines  # both rounds declined: said once
    assert "vectorised update declined" in lines[0]
    assert "client by client" in lines[0]
    for part in why:
        assert part in lines[0], lines[0]


@dataclass(frozen=True)
class ShuffledTraining(LocalTraining):
    """``LocalTraining`` with an option the vectorised path has never heard of (the serial
    loop ignores it): a new option the stacked loop does not implement yet."""

    shuffle: bool = True


@dataclass(frozen=True)
class LongerTraining(LocalTraining):
    """A ``LocalTraining`` subclass that changes the loop's length (the serial loop follows)."""

    def num_steps(self, num_examples: int) -> int:
        return super().num_steps(num_examples) + 1


LOCAL_BN = LocalTraining(lr=0.1, epochs=2, batch_size=10)  # no minibatch of a single example

DECLINES: dict[str, tuple[Recipe, Callable[[], nn.Module], Runtime | None, tuple[str, ...]]] = {
    "objective": (
        recipe_with(PLAIN_SGD, objective=Prox(mu=0.1)),
        make_mlp,
        None,
        ("objective Prox(mu=0.1)", "Plain() only"),
    ),
    "new-option": (
        recipe_with(ShuffledTraining(lr=0.1, epochs=2, batch_size=8)),
        make_mlp,
        None,
        ("LocalTraining option shuffle=True", "does not implement it"),
    ),
    "subclass": (
        recipe_with(LongerTraining(lr=0.1, epochs=2, batch_size=8)),
        make_mlp,
        None,
        ("local training LongerTraining", "not a subclass"),
    ),
    "dropout": (
        recipe_with(PLAIN_SGD),
        make_dropout_mlp,
        None,
        ("body.5: dropout draws random numbers in train mode",),
    ),
    "random-numbers": (
        recipe_with(PLAIN_SGD),
        make_noisy_mlp,
        None,
        ("train-mode forward draws random numbers",),
    ),
    "buffer": (
        recipe_with(PLAIN_SGD),
        make_counting_mlp,
        None,
        ("train-mode forward updates buffers ['calls']",),
    ),
    "batchnorm": (
        recipe_with(LOCAL_BN),
        make_tiny_model,
        None,
        ("body.2: BatchNorm1d in train mode",),
    ),
    "feature-cache": (
        recipe_with(PLAIN_SGD, policy=HeadOnly()),
        make_mlp,
        None,
        ("only the head 'head' trains", "feature cache serves it"),
    ),
    "max-params": (
        recipe_with(PLAIN_SGD),
        make_mlp,
        AutoRuntime(max_params=100),  # the MLP has ~1.3k
        ("1,283 trainable parameters > max_params=100",),
    ),
    "convolutions": (
        recipe_with(PLAIN_SGD),
        make_conv_net,
        AutoRuntime(),
        ("conv: a convolution trains (and convolutions=False",),
    ),
}


@pytest.mark.parametrize("reason", list(DECLINES))
def test_each_decline_is_one_warning_and_exactly_the_serial_results(
    reason: str, spy: Spy, caplog: pytest.LogCaptureFixture
) -> None:
    recipe, model_fn, runtime, why = DECLINES[reason]
    assert_declines(recipe, model_fn, spy, caplog, why, runtime)


def test_an_optimizer_the_stacked_loop_does_not_implement_is_declined(
    spy: Spy, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when ``LocalTraining`` gains an optimiser before the stacked loop does."""
    monkeypatch.setattr(support, "OPTIONS", {**support.OPTIONS, "optimizer": ("sgd",)})
    adam = LocalTraining(optimizer="adam", lr=0.01, epochs=2, batch_size=8)
    why = ("LocalTraining option optimizer='adam'", "implements optimizer in ['sgd']")
    assert_declines(recipe_with(adam), make_mlp, spy, caplog, why)


def test_a_decline_is_said_once_per_run(caplog: pytest.LogCaptureFixture) -> None:
    recipe = recipe_with(PLAIN_SGD, objective=Prox(mu=0.1))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(recipe, VectorizedRuntime(), rounds=3)
        assert len(declines(caplog)) == 1
        run(recipe, VectorizedRuntime(), rounds=2)  # the same run again: nothing new
        assert len(declines(caplog)) == 1
        run(recipe, VectorizedRuntime(), rounds=1, seed=4)  # another run
    assert len(declines(caplog)) == 2
    other = recipe_with(PLAIN_SGD, objective=Prox(mu=0.2))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(other, VectorizedRuntime(), rounds=1)  # another reason in the first run
    assert len(declines(caplog)) == 3


def test_the_frozen_convolution_of_a_head_only_run_does_not_decline(spy: Spy) -> None:
    """``AutoRuntime`` declines training convolutions only: a frozen one is not stacked."""
    recipe = recipe_with(PLAIN_SGD, policy=HeadOnly())  # only the head trains
    with no_feature_cache():
        ref, _ = run(recipe, SerialRuntime(), make_conv_net, rounds=2)
        got, _ = run(recipe, AutoRuntime(), make_conv_net, rounds=2)
    assert max_diff(ref.params, got.params) <= TOLERANCE
    assert (spy.batched, spy.declined) == (2, 0)


def _round_tasks(recipe: Recipe) -> list[ClientTask]:
    tasks: list[ClientTask] = []

    class Keep:
        def map(self, fn: Callable[[Any], Reply], ts: Sequence[Any]) -> list[Reply]:
            tasks.extend(ts)
            return [fn(t) for t in ts]

    run(recipe, Keep(), rounds=1)
    return tasks


def test_cohort_declines_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    recipe = recipe_with(PLAIN_SGD)
    tasks = _round_tasks(recipe)
    fn = ClientUpdate(recipe, make_mlp)
    odd = dataclasses.replace(tasks[1], data=TensorData(tasks[1].data.x.double(), tasks[1].data.y))
    empty = [dataclasses.replace(t, data=TensorData(t.data.x[:0], t.data.y[:0])) for t in tasks]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert fn.batch(tasks[:1]) is None
        assert fn.batch([tasks[0], odd, *tasks[2:]]) is None
        assert vectorized_update(empty, recipe=recipe, model_fn=make_mlp) is None
    lines = declines(caplog)
    assert len(lines) == 3
    assert "(fewer than two tasks)" in lines[0]
    assert "(clients' examples differ in shape or dtype)" in lines[1]
    assert "(no client has data)" in lines[2]
    assert fn.batch(tasks) is not None


@dataclass(frozen=True)
class FailingTransform:
    """A client transform that fails (after training, while the update is prepared)."""

    def init(self, params: Any) -> dict[str, torch.Tensor]:
        return {}

    def apply(
        self, update: dict[str, torch.Tensor], state: dict[str, torch.Tensor], ctx: Any
    ) -> Any:
        raise ValueError("transform failed")


def test_an_error_is_declined_loudly_then_raised_by_the_serial_path_naming_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipe = recipe_with(PLAIN_SGD, client_transforms=(FailingTransform(),))
    with pytest.raises(RuntimeError, match=r"client c0, round 1 failed: ValueError"):
        run(recipe, SerialRuntime(), rounds=1)
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        pytest.raises(RuntimeError, match=r"client c0, round 1 failed: ValueError"),
    ):
        run(recipe, VectorizedRuntime(), rounds=1)
    assert declines(caplog) == [
        "vectorised update declined (training raised ValueError('transform failed')): the "
        f"cohort of {len(SIZES)} clients trains client by client, as on the serial runtime"
    ]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_supports_names_what_it_declines_and_accepts_what_it_trains() -> None:
    recipe = recipe_with(PLAIN_SGD)
    model = make_mlp()
    plan = Full().plan(model)
    example = torch.randn(2, 1, 8, 8)
    assert support.supports(recipe, model, plan, example=example) is None
    assert support.supports(recipe, model, plan, max_params=10) == (
        "1,283 trainable parameters > max_params=10 (stacked weights stream through memory: "
        "client by client is faster)"
    )
    tied = Tied()
    assert support.supports(recipe, tied, Full().plan(tied)) == (
        "tied parameters (stacking each key would untie them)"
    )
    frozen = make_mlp()
    nothing = ParamPlan.for_model(frozen, dict.fromkeys(frozen.state_dict(), "frozen"))
    assert support.supports(recipe, frozen, nothing) == "nothing trains"


# --- what it implements: each option, within the tolerance ---------------------------------------

# a value other than the default for every option of support.OPTIONS
OPTION_VALUES: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 0.2,
    "momentum": 0.5,
    "weight_decay": 0.01,
    "epochs": 3,
    "steps": 5,
    "batch_size": 5,
    "loss": "mse",
}


def test_every_option_the_stacked_loop_implements_has_a_value_tested_here() -> None:
    assert set(OPTION_VALUES) == set(support.OPTIONS)
    names = {f.name for f in dataclasses.fields(LocalTraining)}
    assert set(support.OPTIONS) <= names  # no stale name: each is a LocalTraining option


def _regression(data: FederatedDataset) -> FederatedDataset:
    train = {
        c: TensorData(d.x, torch.nn.functional.one_hot(d.y, 3).float())
        for c, d in data.train.items()
    }
    return FederatedDataset(train, data.test, 3)


@pytest.mark.parametrize("option", list(OPTION_VALUES))
def test_each_implemented_option_matches_serial_within_the_tolerance(
    option: str, spy: Spy, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"lr": 0.05, "epochs": 1, "batch_size": 8}
    local = LocalTraining(**{**base, option: OPTION_VALUES[option]})
    data = _regression(make_data()) if option == "loss" else make_data()
    recipe = recipe_with(local)
    ref, _ = run(recipe, SerialRuntime(), data=data, rounds=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got, _ = run(recipe, VectorizedRuntime(), data=data, rounds=2)
    assert declines(caplog) == []
    assert spy.batched == 2
    assert not tree.equal(ref.params, run(recipe, SerialRuntime(), data=data, rounds=0)[0].params)
    assert max_diff(ref.params, got.params) <= TOLERANCE
