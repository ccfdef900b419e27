"""Updates that pass the shape checks but would still harm the global model: a finite value
that overflows the mean, a weight no example count backs, a counter change no round makes, a
norm beyond the configured cap, a client whose training raises. Each is that client's
rejection, the round goes on, and the global model stays finite."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
import torch
from tests.conftest import make_tiny_data, make_tiny_model

from fedtransfer import LocalTraining, Recipe, Reply, ServerState, run_round, tree
from fedtransfer.codecs import Float32, Payload
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.errors import FedTransferError
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients, ServerPipeline, ServerSGD, UpdateLimits
from fedtransfer.transfer import Full

pytestmark = pytest.mark.usefixtures("single_thread")

VICTIM = "c2"


@dataclass(frozen=True)
class Tampering:
    """The serial runtime; ``tamper`` rewrites the victim's reply."""

    tamper: Callable[[Reply], Reply]

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        return [
            self.tamper(rep) if rep.client == VICTIM else rep
            for rep in SerialRuntime().map(fn, tasks)
        ]


def _rewrite(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Reply], Reply]:
    def tamper(rep: Reply) -> Reply:
        update = Float32().decode(Payload.from_bytes(rep.uplink))
        change(update)
        return dataclasses.replace(rep, uplink=Float32().encode(update).to_bytes())

    return tamper


def _recipe(**changes: Any) -> Recipe:
    return Recipe(
        policy=Full(),
        training=LocalTraining(lr=0.1, steps=2, batch_size=8),
        sampler=AllClients(),
        **changes,
    )


def _rounds(recipe: Recipe, runtime: Any, n: int, data: FederatedDataset | None = None) -> list:
    data = data or make_tiny_data()
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    out = []
    for _ in range(n):
        state, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
        out.append((state, report))
    return out


def _huge_bias(update: dict[str, torch.Tensor]) -> None:
    update["head.bias"] = torch.full_like(update["head.bias"], 3e38)


def test_a_finite_update_that_would_overflow_the_global_model_is_rejected() -> None:
    """One of five clients sends +3e38 (finite float32) in the head bias every round: the
    global bias grows by 6e37 a round and, unchecked, reaches inf in round 6. With the check
    the model stays finite: from the round it would overflow, that client is rejected, naming
    why, and the others are aggregated."""
    rounds = _rounds(_recipe(), Tampering(_rewrite(_huge_bias)), 8)
    for state, _ in rounds:
        floats = [v for v in state.params.values() if v.is_floating_point()]
        assert all(bool(torch.isfinite(v).all()) for v in floats)
    refused = [report for _, report in rounds if report.rejected]
    assert len(refused) >= 2 and refused[-1].round == 8
    for report in refused:
        assert [c for c, _ in report.rejected] == [VICTIM]
        why = report.rejected[0][1]
        assert "would not be finite" in why and "head.bias" in why
        assert len(report.accepted) == 4 and report.metrics["server/rolled_back"] == 1.0


def test_the_rolled_back_round_equals_the_round_without_the_offender() -> None:
    def inf_making(update: dict[str, torch.Tensor]) -> None:
        update["head.bias"] = torch.full_like(update["head.bias"], 3.4e38)

    # a server learning rate of 10 takes the mean's 6.8e37 past float32's 3.4e38 in one round
    recipe = _recipe(pipeline=ServerPipeline(post=(ServerSGD(lr=10.0),)))
    ((tampered, report),) = _rounds(recipe, Tampering(_rewrite(inf_making)), 1)
    assert [c for c, _ in report.rejected] == [VICTIM]
    dropped = Tampering(lambda rep: dataclasses.replace(rep, error="dropped"))
    ((without, _),) = _rounds(recipe, dropped, 1)
    assert tree.equal(tampered.params, without.params)


def test_a_weight_above_the_known_example_count_is_rejected() -> None:
    tamper = Tampering(lambda rep: dataclasses.replace(rep, num_examples=1e308))  # type: ignore[arg-type]
    ((_state, report),) = _rounds(_recipe(), tamper, 1)
    assert [c for c, _ in report.rejected] == [VICTIM]
    assert "exceeds the 24 examples the server knows it has" in report.rejected[0][1]


def test_an_integer_counter_change_no_round_makes_is_rejected() -> None:
    def counter(update: dict[str, torch.Tensor]) -> None:
        update["body.2.num_batches_tracked"] = torch.tensor(2**63 - 1)

    ((_, report),) = _rounds(_recipe(), Tampering(_rewrite(counter)), 1)
    assert [c for c, _ in report.rejected] == [VICTIM]
    assert "'body.2.num_batches_tracked' changes by 9223372036854775807" in report.rejected[0][1]


def test_max_update_norm_rejects_rather_than_clips() -> None:
    def big(update: dict[str, torch.Tensor]) -> None:
        update["head.weight"] = update["head.weight"] + 100.0

    limits = UpdateLimits(max_update_norm=50.0)
    ((_state, report),) = _rounds(_recipe(limits=limits), Tampering(_rewrite(big)), 1)
    assert [c for c, _ in report.rejected] == [VICTIM]
    assert "exceeds max_update_norm 50" in report.rejected[0][1]
    ((_free, free_report),) = _rounds(_recipe(), Tampering(_rewrite(big)), 1)
    assert not free_report.rejected  # without the cap it is aggregated


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_update_norm": 0.0}, "max_update_norm"), ({"max_weight": float("inf")}, "max_weight")],
)
def test_update_limits_refuse_bounds_that_are_not_finite_positive_numbers(
    kwargs: dict[str, float], match: str
) -> None:
    from fedtransfer.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        UpdateLimits(**kwargs)


def _with_label(label: int) -> tuple[dict[str, TensorData], dict[str, TensorData]]:
    data = make_tiny_data()
    train = dict(data.train)
    y = train[VICTIM].y.clone()
    y[0] = label
    train[VICTIM] = TensorData(train[VICTIM].x, y)
    return train, dict(data.test)


def test_a_population_with_a_label_out_of_range_is_refused_when_built() -> None:
    train, test = _with_label(15)
    with pytest.raises(
        FedTransferError, match=r"client 'c2' \(train\): label 15 is outside \[0, 3\)"
    ):
        FederatedDataset(train, test, 3)


def test_a_client_whose_training_raises_is_rejected_and_the_round_goes_on() -> None:
    """A lazily read population is checked client by client as it is read, not at build: a
    label out of range ends that client's training with an IndexError — its rejection, with
    the reason, and the other clients aggregated."""
    train, test = _with_label(15)
    data = FederatedDataset(MappingProxyType(train), MappingProxyType(test), 3)
    ((_state, report),) = _rounds(_recipe(), SerialRuntime(), 1, data=data)
    assert [c for c, _ in report.rejected] == [VICTIM]
    assert (
        "failed: IndexError" in report.rejected[0][1] and "out of bounds" in report.rejected[0][1]
    )
    assert len(report.accepted) == 4


def test_a_round_in_which_every_client_raises_ends_with_the_first_reason() -> None:
    """Not a misbehaving client but a broken set-up: the run stops, naming it."""
    data = make_tiny_data()
    train = {c: TensorData(d.x[:, :, :4, :4], d.y) for c, d in data.train.items()}  # 4x4 inputs
    broken = FederatedDataset(train, dict(data.test), 3)
    with pytest.raises(
        RuntimeError, match=r"client c0, round 1 failed: RuntimeError.*so did every"
    ):
        _rounds(_recipe(), SerialRuntime(), 1, data=broken)
