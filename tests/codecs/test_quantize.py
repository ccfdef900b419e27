"""Int8: per-element error within a quantisation step, unbiased stochastic rounding, validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from fedtransfer import ConfigError
from fedtransfer.codecs import Int8, Payload
from fedtransfer.errors import PayloadError

CONFIGS = [Int8(), Int8("channel"), Int8(stochastic=True), Int8("channel", stochastic=True)]


def _roundtrip(codec: Int8, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return codec.decode(Payload.from_bytes(codec.encode(params).to_bytes()))


def _forge(payload: Payload, i: int, **change: Any) -> Payload:
    """``payload`` with entry ``i`` changed, through bytes (it parses; only its sense is wrong)."""
    entries = list(payload.entries)
    entries[i] = dataclasses.replace(entries[i], **change)
    return Payload.from_bytes(Payload(payload.codec, tuple(entries), payload.meta).to_bytes())


def _steps(codec: Int8, x: Tensor) -> Tensor:
    """Each element's quantisation step (its channel's scale), shaped like ``x``."""
    rows = codec.encode({"x": x}).entries[1].tensor
    scale = rows[:, 1].double()
    per_row = x.numel() // scale.numel()
    return scale.repeat_interleave(per_row).reshape(x.shape)


# Configuration.


@pytest.mark.parametrize(
    "kwargs",
    [
        {"granularity": "row"},
        {"granularity": None},
        {"stochastic": 1},
        {"seed": 1.5},
        {"seed": True},
    ],
)
def test_bad_settings_are_config_errors_naming_the_value(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=repr(next(iter(kwargs.values()))).replace(".", r"\.")):
        Int8(**kwargs)


def test_stochastic_and_seed_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Int8("tensor", True)  # type: ignore[misc]
    assert repr(Int8("channel", stochastic=True, seed=3)) == (
        "Int8(granularity='channel', stochastic=True, seed=3)"
    )


def test_declared_bounds() -> None:
    assert Int8().error_bound == 1 / 255 and Int8("channel").error_bound == 1 / 255
    assert Int8(stochastic=True).error_bound == 2 / 255


# Error.


@pytest.mark.parametrize("codec", CONFIGS, ids=repr)
@pytest.mark.parametrize("offset", [0.0, 5.0, -5.0])
@pytest.mark.parametrize("seed", range(3))
def test_every_element_is_within_a_quantisation_step(codec: Int8, offset: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 50, generator=gen) * torch.rand(6, 1, generator=gen) * 10 + offset
    err = (_roundtrip(codec, {"x": x})["x"].double() - x.double()).abs()
    allowed = _steps(codec, x) * (1.0 if codec.stochastic else 0.5)
    assert bool((err <= allowed * (1 + 1e-6)).all())
    assert float(err.max()) <= codec.error_bound * float(x.abs().max())


def test_channels_get_their_own_range() -> None:
    x = torch.stack([torch.linspace(-1, 1, 100), torch.linspace(-1000, 1000, 100)])
    per_tensor = (_roundtrip(Int8(), {"x": x})["x"] - x)[0].abs().max()
    per_channel = (_roundtrip(Int8("channel"), {"x": x})["x"] - x)[0].abs().max()
    assert float(per_channel) <= 1 / 255 < float(per_tensor)


def test_channel_ranges_have_one_row_per_channel_and_vectors_one_row() -> None:
    payload = Int8("channel").encode({"w": torch.randn(5, 3, 2), "b": torch.randn(5)})
    assert [(e.key, list(e.tensor.shape)) for e in payload.entries] == [
        ("w", [5, 3, 2]),
        ("w#range", [5, 2]),
        ("b", [5]),
        ("b#range", [1, 2]),
    ]
    assert payload.meta == {"granularity": "channel"}


def test_codes_span_the_full_byte_range() -> None:
    entries = Int8().encode({"x": torch.tensor([-3.0, 1.0, 7.0])}).entries
    assert entries[0].tensor.tolist() == [0, 102, 255] and entries[0].tensor.dtype == torch.uint8
    assert entries[1].tensor.tolist() == [[-3.0, pytest.approx(10 / 255)]]


@pytest.mark.parametrize("codec", CONFIGS, ids=repr)
@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(4, 3),
        torch.full((4, 3), 3.7),
        torch.full((5,), -1e-20),
        torch.tensor(2.5),
        torch.full((3,), 0.1, dtype=torch.float64),
        torch.full((2, 2), 0.3, dtype=torch.bfloat16),
    ],
    ids=["zeros", "3.7", "-1e-20", "scalar", "float64", "bfloat16"],
)
def test_constant_tensors_roundtrip_exactly(codec: Int8, x: Tensor) -> None:
    back = _roundtrip(codec, {"x": x})["x"]
    assert back.dtype == x.dtype and torch.equal(back, x)


def test_constant_channels_next_to_varying_ones_are_exact() -> None:
    x = torch.stack([torch.full((4,), 0.7), torch.randn(4), torch.zeros(4)])
    back = _roundtrip(Int8("channel"), {"x": x})["x"]
    assert torch.equal(back[0], x[0]) and torch.equal(back[2], x[2])


def test_float64_tensors_keep_float64_ranges() -> None:
    x = torch.tensor([1e300, -1e300, 0.5], dtype=torch.float64)
    payload = Int8().encode({"x": x})
    assert payload.entries[1].tensor.dtype == torch.float64
    back = Int8().decode(payload)["x"]
    # The midpoint 0.5 is half a step from both codes: the bound is tight, up to rounding.
    assert back.dtype == torch.float64
    assert float((back - x).abs().max()) <= (1 / 255 + 2**-24) * 1e300


def test_float64_range_too_wide_for_float64_raises() -> None:
    x = torch.tensor([1.7e308, -1.7e308], dtype=torch.float64)
    with pytest.raises(PayloadError, match=r"'x'.*too wide.*Exact"):
        Int8().encode({"x": x})


def test_tiny_ranges_do_not_collapse() -> None:
    x = torch.tensor([0.0, 1e-45, 3e-45])  # float32 subnormals: width / 255 underflows
    back = _roundtrip(Int8(), {"x": x})["x"]
    assert torch.equal(back, x)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_raise_naming_the_tensor(value: float) -> None:
    with pytest.raises(PayloadError, match=r"'layer\.w'.*non-finite.*" + str(value)):
        Int8().encode({"ok": torch.ones(2), "layer.w": torch.tensor([1.0, value])})


def test_uint8_parameters_travel_as_is_next_to_codes() -> None:
    params = {"mask": torch.tensor([0, 7, 255], dtype=torch.uint8), "w": torch.randn(3)}
    back = _roundtrip(Int8(), params)
    assert torch.equal(back["mask"], params["mask"])


def test_a_key_named_like_a_range_entry_is_refused() -> None:
    with pytest.raises(PayloadError, match=r"'w#range' collides"):
        Int8().encode({"w": torch.ones(2), "w#range": torch.ones(2, dtype=torch.int64)})


# Stochastic rounding.


def test_stochastic_rounding_is_unbiased() -> None:
    # min 0 and max 255 make the step exactly 1; fractions 0.3/0.7/0.5/0.25 are where
    # round-to-nearest is biased by up to 0.3.
    x = torch.tensor([0.0, 255.0, 10.3, 100.7, 37.5, 200.25])
    runs = 2000
    draws = torch.stack(
        [
            Int8(stochastic=True, seed=s).decode(Int8(stochastic=True, seed=s).encode({"x": x}))[
                "x"
            ]
            for s in range(runs)
        ]
    )
    assert bool(((draws == x.floor()) | (draws == x.ceil())).all())
    # Each draw lies in an interval of width 1, so by Hoeffding's inequality
    # P(|mean - x| >= 0.1) <= 2 exp(-2 * 2000 * 0.1**2) < 1e-17 per element.
    assert float((draws.double().mean(0) - x.double()).abs().max()) < 0.1
    nearest = _roundtrip(Int8(), {"x": x})["x"]
    assert float((nearest - x).abs().max()) > 0.29


def test_stochastic_encode_is_reproducible_and_depends_on_seed_key_and_values() -> None:
    x = torch.randn(500, generator=torch.Generator().manual_seed(0))
    codes = Int8(stochastic=True, seed=1).encode({"a": x}).entries[0].tensor
    again = Int8(stochastic=True, seed=1).encode({"a": x.clone()}).entries[0].tensor
    other_seed = Int8(stochastic=True, seed=2).encode({"a": x}).entries[0].tensor
    other_key = Int8(stochastic=True, seed=1).encode({"b": x}).entries[0].tensor
    assert torch.equal(codes, again)
    assert not torch.equal(codes, other_seed) and not torch.equal(codes, other_key)


def test_stochastic_and_nearest_payloads_share_a_layout() -> None:
    x = {"w": torch.randn(4, 3)}
    payload = Int8("channel", stochastic=True).encode(x)
    assert Int8("channel").decode(payload).keys() == x.keys()


# Malformed payloads: they parse, but do not mean anything Int8 produces.


def _payload(codec: Int8 | None = None) -> Payload:
    codec = codec or Int8()
    return codec.encode({"w": torch.randn(3, 4), "n": torch.tensor([1, 2])})


def test_decode_rejects_codes_of_another_dtype() -> None:
    payload = _forge(_payload(), 0, tensor=torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(PayloadError, match=r"'w' is stored as torch.int8, expected uint8"):
        Int8().decode(payload)


@pytest.mark.parametrize(
    "meta",
    [{"dtype": "float32", "scale": 1.0}, {"dtype": "int64"}, {"dtype": None}, {"shape": [3, 4]}],
    ids=["extra", "int", "null", "no-dtype"],
)
def test_decode_rejects_bad_entry_meta(meta: dict[str, Any]) -> None:
    with pytest.raises(PayloadError, match=r"meta|dtype"):
        Int8().decode(_forge(_payload(), 0, meta=meta))


def test_decode_rejects_codes_without_meta() -> None:
    # The uint8 codes then read as a tensor sent as-is, and the range has nothing to belong to.
    with pytest.raises(PayloadError, match=r"floating tensor 'w#range' carries no meta"):
        Int8().decode(_forge(_payload(), 0, meta={}))


@pytest.mark.parametrize(
    "rows",
    [
        torch.zeros(1, 2, dtype=torch.float16),
        torch.zeros(1, 2, dtype=torch.float64),
        torch.zeros(2, 2),
        torch.zeros(1, 3),
        torch.zeros(2),
    ],
    ids=["float16", "float64", "two-rows", "three-cols", "flat"],
)
def test_decode_rejects_a_range_of_the_wrong_dtype_or_shape(rows: Tensor) -> None:
    with pytest.raises(
        PayloadError, match=r"'w#range' is .* expected torch.float32 of shape \[1, 2\]"
    ):
        Int8().decode(_forge(_payload(), 1, tensor=rows))


def test_decode_rejects_a_range_whose_rows_do_not_match_the_channels() -> None:
    payload = _forge(_payload(Int8("channel")), 1, tensor=torch.zeros(4, 2))
    with pytest.raises(PayloadError, match=r"shape \[3, 2\]"):
        Int8("channel").decode(payload)


@pytest.mark.parametrize(
    "row",
    [[0.0, math.nan], [math.nan, 1.0], [0.0, math.inf], [-math.inf, 1.0], [0.0, -1.0]],
    ids=["nan-scale", "nan-min", "inf-scale", "inf-min", "negative-scale"],
)
def test_decode_rejects_non_finite_or_negative_ranges(row: list[float]) -> None:
    with pytest.raises(PayloadError, match=r"'w#range' has \(min, scale\)"):
        Int8().decode(_forge(_payload(), 1, tensor=torch.tensor([row])))


def test_decode_rejects_a_missing_range() -> None:
    payload = Int8().encode({"w": torch.randn(3)})
    forged = Payload(payload.codec, payload.entries[:1], payload.meta)
    with pytest.raises(PayloadError, match=r"followed by the end of the payload"):
        Int8().decode(Payload.from_bytes(forged.to_bytes()))


@pytest.mark.parametrize(
    "change", [{"key": "v#range"}, {"meta": {"note": 1}}], ids=["renamed", "meta"]
)
def test_decode_rejects_a_range_that_is_not_the_companion(change: dict[str, Any]) -> None:
    with pytest.raises(PayloadError, match=r"expected its companion 'w#range'"):
        Int8().decode(_forge(_payload(), 1, **change))


@pytest.mark.parametrize(
    ("encoder", "decoder"), [(Int8(), Int8("channel")), (Int8("channel"), Int8())], ids=repr
)
def test_decode_rejects_the_other_granularity(encoder: Int8, decoder: Int8) -> None:
    with pytest.raises(PayloadError, match="granularity"):
        decoder.decode(_payload(encoder))


@pytest.mark.parametrize("meta", [{}, {"granularity": "tensor", "seed": 0}])
def test_decode_rejects_other_payload_meta(meta: dict[str, Any]) -> None:
    payload = _payload()
    forged = Payload.from_bytes(Payload(payload.codec, payload.entries, meta).to_bytes())
    with pytest.raises(PayloadError, match="payload meta"):
        Int8().decode(forged)


def test_decode_never_returns_inf_from_a_huge_range() -> None:
    payload = _forge(_payload(), 1, tensor=torch.tensor([[3e38, 3e38]]))
    back = Int8().decode(payload)["w"]
    assert bool(torch.isfinite(back).all())
