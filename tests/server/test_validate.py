"""Malformed client updates are rejected, never aggregated (``validate_update`` and ``run_round``).

Each ``run_round`` case tampers with ONE client's result after it trained: a test runtime
runs the real client work, then rewrites that client's uplink bytes (re-encoded with the real
wire format) or its weight. The server must reject it, name the client and the problem, and
aggregate the others exactly as if the bad client had sent nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fedtransfer import Recipe, Reply, ServerState, UpdateRejected, run_round, tree
from fedtransfer.codecs import Float32, Payload
from fedtransfer.data import FederatedDataset
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import ServerAdam, ServerPipeline, validate_update

pytestmark = pytest.mark.usefixtures("single_thread")

VICTIM = "c2"

Tamper = Callable[[Reply], Reply | None]


@dataclass(frozen=True)
class TamperingRuntime:
    """Runs client work serially, then lets ``tamper`` rewrite (or drop) chosen results."""

    tamper: Tamper
    victims: tuple[str, ...] = (VICTIM,)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        results = []
        for task in tasks:
            result = fn(task)
            if result.client in self.victims:
                result = self.tamper(result)
            if result is not None:
                results.append(result)
        return results


def _rewrite(edit: Callable[[dict[str, Tensor]], None]) -> Tamper:
    """A tamper that decodes the real uplink, edits the update in place and re-encodes it."""

    def tamper(result: Reply) -> Reply:
        update = Float32().decode(Payload.from_bytes(result.uplink))
        edit(update)
        return dataclasses.replace(result, uplink=Float32().encode(update).to_bytes())

    return tamper


def _first_float_key(update: dict[str, Tensor]) -> str:
    return next(k for k, v in update.items() if v.dtype.is_floating_point)


def _drop_key(update: dict[str, Tensor]) -> None:
    del update[_first_float_key(update)]


def _add_key(update: dict[str, Tensor]) -> None:
    update["bogus.weight"] = torch.zeros(2)


def _reshape(update: dict[str, Tensor]) -> None:
    k = _first_float_key(update)
    update[k] = update[k].reshape(-1)[:-1]


def _to_int(update: dict[str, Tensor]) -> None:
    k = _first_float_key(update)
    update[k] = update[k].to(torch.int32)


def _poison(value: float) -> Callable[[dict[str, Tensor]], None]:
    def edit(update: dict[str, Tensor]) -> None:
        k = _first_float_key(update)
        update[k] = update[k].clone()
        update[k].view(-1)[0] = value

    return edit


def _garble(result: Reply) -> Reply:
    return dataclasses.replace(result, uplink=result.uplink[: len(result.uplink) // 2])


def _weight(value: float) -> Tamper:
    return lambda result: dataclasses.replace(result, num_examples=value)  # type: ignore[arg-type]


CASES: dict[str, tuple[Tamper, str]] = {
    # refused by the decoder, which reads only what the plan expects
    "missing-key": (_rewrite(_drop_key), "lacks tensors ['body.1.weight']"),
    "extra-key": (_rewrite(_add_key), "'bogus.weight' is not one the receiver has"),
    "wrong-shape": (_rewrite(_reshape), "shape"),
    "wrong-dtype": (_rewrite(_to_int), "decodes to torch.int32, expected torch.float32"),
    "nan": (_rewrite(_poison(float("nan"))), "non-finite"),
    "inf": (_rewrite(_poison(float("inf"))), "non-finite"),
    "undecodable-bytes": (_garble, "does not decode"),
    "zero-weight": (_weight(0), "must be > 0"),
    "negative-weight": (_weight(-5), "must be > 0"),
    "nan-weight": (_weight(float("nan")), "not a finite number"),
    # a Python int no float holds: float() raises OverflowError, which must not end the round
    "huge-int-weight": (_weight(10**400), "not a finite number"),  # type: ignore[arg-type]
    "string-weight": (_weight("9" * 400), "not a finite number"),  # type: ignore[arg-type]
}


def _drop(result: Reply) -> None:
    return None


@pytest.fixture
def fedadam_recipe(tiny_recipe: Recipe) -> Recipe:
    """The tiny recipe with a stateful server optimiser, so server state changes are visible."""
    return dataclasses.replace(tiny_recipe, pipeline=ServerPipeline(post=(ServerAdam(lr=0.01),)))


@pytest.fixture
def start(fedadam_recipe: Recipe, tiny_model_fn: Callable[[], nn.Module]) -> ServerState:
    return ServerState.initial(fedadam_recipe, tiny_model_fn(), seed=0)


@pytest.mark.parametrize("case", list(CASES))
def test_run_round_rejects_malformed_update_naming_client_and_problem(
    case: str,
    fedadam_recipe: Recipe,
    start: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    tamper, reason = CASES[case]
    runtime = TamperingRuntime(tamper)
    _, report = run_round(fedadam_recipe, start, tiny_data, runtime, model_fn=tiny_model_fn)
    assert [client for client, _ in report.rejected] == [VICTIM]
    message = report.rejected[0][1]
    assert VICTIM in message and reason in message


@pytest.mark.parametrize("case", list(CASES))
def test_run_round_aggregates_the_other_clients_after_a_rejection(
    case: str,
    fedadam_recipe: Recipe,
    start: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    tamper, _ = CASES[case]
    tampered, report = run_round(
        fedadam_recipe, start, tiny_data, TamperingRuntime(tamper), model_fn=tiny_model_fn
    )
    absent, _ = run_round(
        fedadam_recipe, start, tiny_data, TamperingRuntime(_drop), model_fn=tiny_model_fn
    )
    assert report.accepted == tuple(c for c in tiny_data.clients if c != VICTIM)
    assert not tree.equal(tampered.params, start.params)
    assert tree.equal(tampered.params, absent.params)
    assert tree.equal(tampered.server, absent.server)


@pytest.mark.parametrize("case", list(CASES))
def test_run_round_with_all_updates_rejected_leaves_params_and_server_unchanged(
    case: str,
    fedadam_recipe: Recipe,
    start: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    tamper, _ = CASES[case]
    params, server = tree.clone(start.params), tree.clone(start.server)
    runtime = TamperingRuntime(tamper, victims=tiny_data.clients)
    new, report = run_round(fedadam_recipe, start, tiny_data, runtime, model_fn=tiny_model_fn)
    assert report.accepted == ()
    assert [c for c, _ in report.rejected] == list(tiny_data.clients)
    assert tree.equal(new.params, params)
    assert tree.equal(new.server, server)


def test_run_round_rejected_client_keeps_no_local_state(
    tiny_data: FederatedDataset, tiny_model_fn: Callable[[], nn.Module], fedadam_recipe: Recipe
) -> None:
    from fedtransfer.transfer import LocalBatchNorm

    recipe = dataclasses.replace(fedadam_recipe, policy=LocalBatchNorm())
    state = ServerState.initial(recipe, tiny_model_fn(), seed=0)
    runtime = TamperingRuntime(_weight(0))
    new, _ = run_round(recipe, state, tiny_data, runtime, model_fn=tiny_model_fn)
    assert VICTIM not in new.holdings.local
    assert set(new.holdings.local) == set(tiny_data.clients) - {VICTIM}


@dataclass(frozen=True)
class PoisoningCodec:
    """A test uplink codec: Float32 on the wire, but every encoded update holds a NaN."""

    inner: Float32 = dataclasses.field(default_factory=Float32)

    @property
    def error_bound(self) -> float:
        return self.inner.error_bound

    def encode(self, params: Any) -> Payload:
        poisoned = {k: v.clone() for k, v in params.items()}
        _poison(float("nan"))(poisoned)
        return self.inner.encode(poisoned)

    def decode(self, payload: Payload, expected: Any = None) -> dict[str, Tensor]:
        return self.inner.decode(payload, expected)


def test_run_round_with_poisoning_uplink_codec_rejects_all_and_keeps_state(
    fedadam_recipe: Recipe,
    start: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    recipe = dataclasses.replace(fedadam_recipe, uplink=PoisoningCodec())
    params, server = tree.clone(start.params), tree.clone(start.server)
    new, report = run_round(recipe, start, tiny_data, SerialRuntime(), model_fn=tiny_model_fn)
    assert [c for c, _ in report.rejected] == list(tiny_data.clients)
    assert all("non-finite" in why for _, why in report.rejected)
    assert tree.equal(new.params, params) and tree.equal(new.server, server)


# --- validate_update directly ------------------------------------------------------------------


def _reference() -> dict[str, Tensor]:
    return {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.tensor(0)}


def _check(update: dict[str, Any], weight: object = 10) -> None:
    validate_update(update, weight, reference=_reference(), client="c7", round=4)


def test_validate_update_accepts_a_matching_update() -> None:
    _check({"w": torch.ones(2, 3), "b": torch.ones(3), "n": torch.tensor(2)})


def test_validate_update_accepts_integer_weight_and_float_weight() -> None:
    update = _reference()
    _check(update, 3)
    _check(update, 0.5)


def test_validate_update_error_carries_client_and_round() -> None:
    with pytest.raises(UpdateRejected) as info:
        _check({"w": torch.ones(2, 3), "b": torch.ones(3)})
    assert (info.value.client, info.value.round) == ("c7", 4)
    assert str(info.value).startswith("client c7, round 4:")


def test_validate_update_rejects_missing_key() -> None:
    with pytest.raises(UpdateRejected, match=r"missing \['n'\]"):
        _check({"w": torch.ones(2, 3), "b": torch.ones(3)})


def test_validate_update_rejects_extra_key() -> None:
    update = {**_reference(), "x": torch.ones(1)}
    with pytest.raises(UpdateRejected, match=r"unexpected \['x'\]"):
        _check(update)


def test_validate_update_rejects_wrong_shape() -> None:
    with pytest.raises(UpdateRejected, match=r"'w' has shape \(3, 2\), expected \(2, 3\)"):
        _check({**_reference(), "w": torch.ones(3, 2)})


def test_validate_update_rejects_wrong_dtype() -> None:
    with pytest.raises(UpdateRejected, match=r"'b' has dtype torch\.float64"):
        _check({**_reference(), "b": torch.ones(3, dtype=torch.float64)})


def test_validate_update_rejects_non_tensor_value() -> None:
    with pytest.raises(UpdateRejected, match="'b' is a list"):
        _check({**_reference(), "b": [0.0, 0.0, 0.0]})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_validate_update_rejects_non_finite_values(bad: float) -> None:
    w = torch.zeros(2, 3)
    w[1, 2] = bad
    with pytest.raises(UpdateRejected, match="'w' holds 1 non-finite"):
        _check({**_reference(), "w": w})


@pytest.mark.parametrize("weight", [0, 0.0, -1, -0.5])
def test_validate_update_rejects_nonpositive_weight(weight: float) -> None:
    with pytest.raises(UpdateRejected, match="must be > 0"):
        _check(_reference(), weight)


@pytest.mark.parametrize(
    "weight",
    [math.nan, math.inf, -math.inf, True, "10", None, 10**400, -(10**400), 10**5000, "9" * 400],
    ids=[
        "nan",
        "inf",
        "-inf",
        "bool",
        "str",
        "none",
        "int-400-digits",
        "-int-400-digits",
        "int-5000-digits",
        "str-400-digits",
    ],
)
def test_validate_update_rejects_non_finite_or_non_numeric_weight(weight: object) -> None:
    with pytest.raises(UpdateRejected, match="not a finite number") as info:
        _check(_reference(), weight)
    assert len(str(info.value)) < 200  # a hostile value is named, not printed whole
