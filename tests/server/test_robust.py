"""Unit tests of the robust aggregators: settings, cohort sizes, weights, dtypes and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment import registry
from fedtransfer.server import (
    Aggregator,
    Bulyan,
    CenteredClipping,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    ServerPipeline,
    TrimmedMean,
)

ALL: list[Aggregator] = [
    Median(),
    TrimmedMean(0.2),
    Krum(1),
    MultiKrum(1, 2),
    Bulyan(1),
    CenteredClipping(1.0),
    NormBound(1.0),
]


def _updates(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(2, 3, generator=gen).to(dtype),
            "b": torch.randn((), generator=gen).to(dtype),
        }
        for _ in range(n)
    ]


def _run(
    agg: Aggregator, updates: list[dict[str, Tensor]], weights: list[float]
) -> dict[str, Tensor]:
    return agg.aggregate(updates, weights, agg.init(updates[0])).value


@pytest.mark.parametrize(
    ("cls", "settings"),
    [
        (TrimmedMean, {"beta": 0.5}),
        (TrimmedMean, {"beta": -0.1}),
        (TrimmedMean, {"beta": math.nan}),
        (Krum, {"f": -1}),
        (Krum, {"f": 1.5}),
        (Krum, {"f": True}),
        (MultiKrum, {"f": 1, "m": 0}),
        (MultiKrum, {"f": -1}),
        (Bulyan, {"f": -2}),
        (CenteredClipping, {"tau": 0.0}),
        (CenteredClipping, {"tau": math.inf}),
        (CenteredClipping, {"tau": 1.0, "iters": 0}),
        (NormBound, {"c": -1.0}),
        (NormBound, {"c": math.nan}),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else str(x),
)
def test_robust_bad_settings_are_config_errors(cls: type, settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"{cls.__name__}: .* must be"):
        cls(**settings)


def test_robust_bad_setting_message_names_rule_and_value() -> None:
    with pytest.raises(ConfigError, match=r"TrimmedMean: beta must be in \[0, 0.5\), got 0.5"):
        TrimmedMean(0.5)


@pytest.mark.parametrize(
    ("agg", "n", "expected"),
    [
        (Krum(1), 4, "at least 5 (2f + 3)"),
        (Krum(0), 2, "at least 3 (2f + 3)"),
        (MultiKrum(2), 6, "at least 7 (2f + 3)"),
        (MultiKrum(1, 5), 5, "at least 6 (m + f)"),
        (Bulyan(1), 6, "at least 7 (4f + 3)"),
        (Bulyan(2), 10, "at least 11 (4f + 3)"),
    ],
    ids=repr,
)
def test_robust_too_few_updates_is_a_compatibility_error(
    agg: Aggregator, n: int, expected: str
) -> None:
    with pytest.raises(CompatibilityError) as info:
        _run(agg, _updates(n), [1.0] * n)
    message = str(info.value)
    assert message.startswith(repr(agg))
    assert f"got {n} updates with positive weight" in message
    assert expected in message
    assert "hint: sample more clients per round or lower f" in message


def test_robust_zero_weight_clients_do_not_count_towards_the_minimum() -> None:
    with pytest.raises(CompatibilityError, match="got 4 updates"):
        _run(Krum(1), _updates(5), [1.0, 1.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("agg", ALL, ids=repr)
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0] * 6, "7 updates but 6 weights"),
        ([1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "finite and >= 0, got -1.0"),
        ([1.0, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0], "finite and >= 0, got nan"),
        ([0.0] * 7, "no update has a positive weight"),
    ],
)
def test_robust_bad_weights_are_value_errors(
    agg: Aggregator, weights: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _run(agg, _updates(7), weights)


@pytest.mark.parametrize("agg", ALL, ids=repr)
def test_robust_mismatched_updates_are_value_errors(agg: Aggregator) -> None:
    ups = _updates(7)
    ups[3] = {"w": ups[3]["w"][:1], "b": ups[3]["b"]}
    with pytest.raises(ValueError, match="differ in keys or shapes"):
        _run(agg, ups, [1.0] * 7)


@pytest.mark.parametrize("agg", ALL, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_robust_returns_the_updates_dtypes(agg: Aggregator, dtype: torch.dtype) -> None:
    ups = _updates(7, dtype=dtype)
    for u in ups:
        u["n"] = torch.tensor([3, 4], dtype=torch.int64)
    out = _run(agg, ups, [1.0] * 7)
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        k: (v.dtype, v.shape) for k, v in ups[0].items()
    }


@pytest.mark.parametrize("agg", ALL, ids=repr)
def test_robust_integer_tensors_are_the_weighted_mean_of_participants(agg: Aggregator) -> None:
    ups = _updates(8)
    counts = [1, 2, 3, 4, 5, 6, 7, 1000]
    for u, c in zip(ups, counts, strict=True):
        u["bn.num_batches_tracked"] = torch.tensor(c)
    weights = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0]  # the last client takes no part
    out = _run(agg, ups, weights)
    assert out["bn.num_batches_tracked"].item() == round((28 + 7) / 8)


@pytest.mark.parametrize("agg", [Median(), TrimmedMean(0.4), NormBound(10.0)], ids=repr)
def test_robust_single_client_gives_its_update(agg: Aggregator) -> None:
    (one,) = _updates(1)
    assert tree.equal(_run(agg, [one], [2.0]), one)


@pytest.mark.parametrize("agg", ALL, ids=repr)
def test_robust_updates_without_floating_tensors(agg: Aggregator) -> None:
    ups = [{"n": torch.tensor([i, 2 * i])} for i in range(7)]
    out = _run(agg, ups, [1.0] * 7)
    assert torch.equal(out["n"], torch.tensor([3, 6]))


def test_trimmed_mean_cut_is_flowers_int_of_beta_n() -> None:
    ups = [{"w": torch.tensor([float(x)])} for x in (0, 1, 2, 3, 100)]
    out = TrimmedMean(0.39).aggregate(ups, [1.0] * 5, {})  # int(1.95) = 1 from each side
    assert out.value["w"].item() == 2.0
    assert out.metrics == {"clients": 5.0, "trimmed": 2.0}


def test_krum_ties_go_to_the_lexicographically_smaller_update() -> None:
    # f = 0, n = 3: 0 and 1 are each other's nearest neighbour, so their scores are equal.
    values = [5.0, 1.0, 0.0]
    for perm in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        ups = [{"w": torch.tensor([values[i]])} for i in perm]
        assert Krum(0).aggregate(ups, [1.0] * 3, {}).value["w"].item() == 0.0


def test_multikrum_with_m_one_is_krum() -> None:
    ups = _updates(6, seed=3)
    assert tree.equal(_run(MultiKrum(1, 1), ups, [2.0] * 6), _run(Krum(1), ups, [2.0] * 6))


def test_centered_clipping_state_lacking_a_key_is_an_error() -> None:
    agg = CenteredClipping(1.0)
    with pytest.raises(ValueError, match=r"state has no 'v/b' of shape \[\]; expected the state"):
        agg.aggregate(_updates(3), [1.0] * 3, {"v/w": torch.zeros(2, 3)})


def test_centered_clipping_state_of_another_shape_is_an_error() -> None:
    agg = CenteredClipping(1.0)
    state = {"v/w": torch.zeros(3, 2), "v/b": torch.zeros(())}
    with pytest.raises(ValueError, match=r"state has no 'v/w' of shape \[2, 3\]"):
        agg.aggregate(_updates(3), [1.0] * 3, state)


def test_centered_clipping_state_is_the_aggregate_and_ignores_weights() -> None:
    agg = CenteredClipping(100.0)
    ups = _updates(4, dtype=torch.float64)
    out = agg.aggregate(ups, [1.0, 2.0, 3.0, 4.0], agg.init(ups[0]))
    expected = tree.weighted_mean(ups, [1.0] * 4)  # nothing clipped: the unweighted mean
    assert out.metrics["clipped"] == 0.0
    for k in expected:
        torch.testing.assert_close(out.value[k], expected[k])
        assert torch.equal(out.state[f"v/{k}"], out.value[k])


def test_centered_clipping_state_flows_through_the_server_pipeline() -> None:
    pipe = ServerPipeline(aggregator=CenteredClipping(tau=1.0))
    params = {"w": torch.zeros(2)}
    state = pipe.init(params)
    assert set(state) == {"aggregator/v/w"}
    ups = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([10.0, 0.0])}]
    first = pipe.apply(ups, [1.0, 1.0], params=params, state=state)
    second = pipe.apply(ups, [1.0, 1.0], params=params, state=first.state)
    assert first.value["w"].tolist() == [0.5, 0.0]
    assert second.value["w"].tolist() == [0.75, 0.0]
    assert second.metrics["aggregator/clipped"] == 1.0


@pytest.mark.parametrize(
    "agg",
    [
        TrimmedMean(0.3),
        Krum(2),
        MultiKrum(2, 4),
        MultiKrum(0),
        Bulyan(3),
        CenteredClipping(0.5, 2),
        NormBound(3.0),
    ],
    ids=repr,
)
def test_robust_settings_round_trip_through_config(agg: Aggregator) -> None:
    data = cfgio.dump(agg)
    assert data["kind"] == registry.kind_of(type(agg))
    assert cfgio.parse(registry.group_of(type(agg)), data) == agg


def test_robust_kinds_are_registered() -> None:
    kinds = registry.kinds(Aggregator)
    assert {k: kinds[k] for k in ("median", "trimmed_mean", "krum", "multikrum", "bulyan")} == {
        "median": Median,
        "trimmed_mean": TrimmedMean,
        "krum": Krum,
        "multikrum": MultiKrum,
        "bulyan": Bulyan,
    }
    assert kinds["centered_clipping"] is CenteredClipping
    assert kinds["norm_bound"] is NormBound


def test_robust_config_error_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"aggregator: Krum: f must be an integer >= 0, got -1"):
        cfgio.parse(Aggregator, {"kind": "krum", "f": -1}, "aggregator")
