"""Float16 and BFloat16: relative bound at every magnitude, range errors, malformed payloads."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from fedtransfer.codecs import BFloat16, Float16, Payload
from fedtransfer.errors import PayloadError

NARROW = [Float16(), BFloat16()]


def _roundtrip(codec: Float16 | BFloat16, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return codec.decode(Payload.from_bytes(codec.encode(params).to_bytes()))


def _forge(payload: Payload, i: int, **change: Any) -> Payload:
    """``payload`` with entry ``i`` changed, through bytes (it parses; only its sense is wrong)."""
    entries = list(payload.entries)
    entries[i] = dataclasses.replace(entries[i], **change)
    return Payload.from_bytes(Payload(payload.codec, tuple(entries), payload.meta).to_bytes())


def _relative_error(original: Tensor, decoded: Tensor) -> float:
    err = (decoded.double() - original.double()).abs().max()
    return float(err / original.double().abs().max())


@pytest.mark.parametrize("codec", NARROW, ids=repr)
@pytest.mark.parametrize("exponent", [-44, -40, -20, -9, -5, 0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_holds_at_every_magnitude(
    codec: Float16 | BFloat16, exponent: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(exponent + 100)
    x = (torch.randn(2000, generator=gen, dtype=torch.float64) * 10.0**exponent).to(dtype)
    assert _relative_error(x, _roundtrip(codec, {"x": x})["x"]) <= codec.error_bound


@pytest.mark.parametrize("codec", NARROW, ids=repr)
def test_values_far_below_the_largest_lose_nothing_relative_to_it(
    codec: Float16 | BFloat16,
) -> None:
    # Values in float16's subnormal range (and below) next to a value of 1.
    x = torch.tensor([1.0, 3e-5, 1e-7, -2e-8, 1e-30, 0.0])
    assert _relative_error(x, _roundtrip(codec, {"x": x})["x"]) <= codec.error_bound


def test_float16_keeps_small_updates_by_an_exact_power_of_two() -> None:
    x = torch.tensor([3e-9, -1e-10, 7e-12])
    payload = Float16().encode({"x": x})
    assert payload.entries[0].meta == {"dtype": "float32", "exp": -29}
    back = Float16().decode(payload)["x"]
    assert _relative_error(x, back) <= 2**-11
    assert bool((back != 0).all())


def test_float16_sends_normal_range_tensors_unscaled() -> None:
    x = torch.tensor([1.5, -2.25, 65504.0, 6.2e-5])
    entry = Float16().encode({"x": x}).entries[0]
    assert entry.meta["exp"] == 0 and entry.tensor.dtype == torch.float16
    assert torch.equal(entry.tensor, x.to(torch.float16))


@pytest.mark.parametrize(("codec", "wire"), [(Float16(), 2), (BFloat16(), 2)], ids=repr)
def test_floats_travel_in_two_bytes(codec: Float16 | BFloat16, wire: int) -> None:
    x = torch.randn(10, 10, dtype=torch.float64)
    entry = codec.encode({"x": x, "n": torch.tensor(3)}).entries[0]
    assert entry.tensor.element_size() == wire and entry.tensor.shape == x.shape


@pytest.mark.parametrize("value", [65504.5, 70000.0, -1e6, 3e38])
def test_float16_refuses_finite_values_beyond_its_range(value: float) -> None:
    with pytest.raises(PayloadError, match=r"'big'.*float16 range.*BFloat16"):
        Float16().encode({"ok": torch.ones(2), "big": torch.tensor([1.0, value])})


def test_float16_accepts_its_largest_finite_value() -> None:
    x = torch.tensor([-65504.0, 65504.0, 1.0])
    assert torch.equal(_roundtrip(Float16(), {"x": x})["x"], x)


@pytest.mark.parametrize(
    "x",
    [torch.tensor([3.4e38]), torch.tensor([1e300], dtype=torch.float64)],
    ids=["float32", "float64"],
)
def test_bfloat16_refuses_values_beyond_its_range(x: Tensor) -> None:
    with pytest.raises(PayloadError, match=r"'x'.*bfloat16 range.*Exact"):
        BFloat16().encode({"x": x})


@pytest.mark.parametrize("codec", NARROW, ids=repr)
def test_non_finite_values_travel_as_is_and_do_not_set_the_scale(
    codec: Float16 | BFloat16,
) -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf, 2e-9, -1e-9])
    entry = codec.encode({"x": x}).entries[0]
    back = codec.decode(codec.encode({"x": x}))["x"]
    assert back[0].isnan() and back[1:3].tolist() == [math.inf, -math.inf]
    assert _relative_error(x[3:], back[3:]) <= codec.error_bound
    assert entry.meta["exp"] == (-29 if isinstance(codec, Float16) else 0)


def test_all_non_finite_tensor_travels() -> None:
    x = torch.tensor([math.nan, -math.inf])
    back = _roundtrip(Float16(), {"x": x})["x"]
    assert back[0].isnan() and back[1] == -math.inf


@pytest.mark.parametrize(
    ("codec", "dtype"),
    [
        (Float16(), torch.float16),
        (BFloat16(), torch.bfloat16),
        (Float16(), torch.bfloat16),  # bfloat16's 8 bits fit in float16's 11
    ],
    ids=["f16-f16", "bf16-bf16", "f16-bf16"],
)
def test_tensors_that_fit_the_wire_dtype_travel_exactly(
    codec: Float16 | BFloat16, dtype: torch.dtype
) -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(0)).to(dtype)
    back = _roundtrip(codec, {"x": x})["x"]
    assert back.dtype == dtype and torch.equal(back, x)


@pytest.mark.parametrize(
    ("codec", "step"), [(Float16(), 2**-10), (BFloat16(), 2**-7)], ids=["f16", "bf16"]
)
def test_float64_rounds_once_to_nearest(codec: Float16 | BFloat16, step: float) -> None:
    # Just above half a step: float64 -> float32 -> 16-bit would round down twice to 1.
    x = torch.tensor([1 + step / 2 + 2**-40], dtype=torch.float64)
    assert _roundtrip(codec, {"x": x})["x"].item() == 1 + step


def test_bfloat16_does_not_overflow_a_float16_tensor() -> None:
    # float16's largest value rounds up to 65536 in bfloat16, which float16 cannot hold.
    x = torch.tensor([65504.0, -65504.0, 1.0], dtype=torch.float16)
    back = _roundtrip(BFloat16(), {"x": x})["x"]
    assert back.dtype == torch.float16 and torch.equal(back, x)


@pytest.mark.parametrize("codec", NARROW, ids=repr)
def test_float64_tensors_come_back_as_float64(codec: Float16 | BFloat16) -> None:
    x = torch.tensor([0.1, -0.2, 1e-40], dtype=torch.float64)
    back = _roundtrip(codec, {"x": x})["x"]
    assert back.dtype == torch.float64 and _relative_error(x, back) <= codec.error_bound


# Malformed payloads: they parse, but do not mean anything Float16/BFloat16 produces.


def _payload(codec: Float16 | BFloat16) -> Payload:
    return codec.encode({"w": torch.tensor([1.0, -2.0]), "n": torch.tensor([1, 2])})


@pytest.mark.parametrize("codec", NARROW, ids=repr)
def test_decode_rejects_a_wrong_stored_dtype(codec: Float16 | BFloat16) -> None:
    payload = _forge(_payload(codec), 0, tensor=torch.tensor([1.0, -2.0]))
    with pytest.raises(PayloadError, match=r"'w' is stored as torch.float32"):
        codec.decode(payload)


@pytest.mark.parametrize("codec", NARROW, ids=repr)
@pytest.mark.parametrize(
    "meta",
    [{}, {"dtype": "float32"}, {"exp": 0}, {"dtype": "float32", "exp": 0, "scale": 2.0}],
    ids=["none", "no-exp", "no-dtype", "extra"],
)
def test_decode_rejects_meta_with_wrong_fields(
    codec: Float16 | BFloat16, meta: dict[str, Any]
) -> None:
    with pytest.raises(PayloadError, match="meta"):
        codec.decode(_forge(_payload(codec), 0, meta=meta))


@pytest.mark.parametrize("codec", NARROW, ids=repr)
@pytest.mark.parametrize("dtype", ["int64", "float128", 3, None, ["float32"]])
def test_decode_rejects_a_recorded_dtype_that_is_not_a_float(
    codec: Float16 | BFloat16, dtype: object
) -> None:
    payload = _forge(_payload(codec), 0, meta={"dtype": dtype, "exp": 0})
    with pytest.raises(PayloadError, match="original dtype"):
        codec.decode(payload)


@pytest.mark.parametrize("codec", NARROW, ids=repr)
@pytest.mark.parametrize("exp", [1, -1075, 0.5, True, "0", None])
def test_decode_rejects_a_bad_exponent(codec: Float16 | BFloat16, exp: object) -> None:
    payload = _forge(_payload(codec), 0, meta={"dtype": "float32", "exp": exp})
    with pytest.raises(PayloadError, match="exponent"):
        codec.decode(payload)


@pytest.mark.parametrize("codec", NARROW, ids=repr)
def test_decode_rejects_meta_on_a_tensor_that_travels_as_is(codec: Float16 | BFloat16) -> None:
    payload = _forge(_payload(codec), 1, meta={"dtype": "float32", "exp": 0})
    with pytest.raises(PayloadError, match=r"'n' carries meta"):
        codec.decode(payload)


@pytest.mark.parametrize("codec", NARROW, ids=repr)
def test_decode_rejects_payload_meta(codec: Float16 | BFloat16) -> None:
    payload = _payload(codec)
    forged = Payload(payload.codec, payload.entries, {"round": 3})
    with pytest.raises(PayloadError, match="payload meta"):
        codec.decode(Payload.from_bytes(forged.to_bytes()))


def test_float16_decode_rejects_a_bfloat16_payload() -> None:
    with pytest.raises(PayloadError, match=r"codec 'bfloat16', expected 'float16'"):
        Float16().decode(_payload(BFloat16()))


def test_decoded_tiny_exponent_stays_finite() -> None:
    payload = _forge(
        _payload(Float16()), 0, meta={"dtype": "float32", "exp": -1074}, tensor=torch.ones(2).half()
    )
    assert torch.equal(Float16().decode(payload)["w"], torch.zeros(2))


def test_entry_meta_records_the_original_dtype() -> None:
    payload = Float16().encode({"a": torch.ones(1, dtype=torch.float64), "b": torch.ones(1)})
    assert [dict(e.meta) for e in payload.entries] == [
        {"dtype": "float64", "exp": 0},
        {"dtype": "float32", "exp": 0},
    ]
    assert [e.tensor.dtype for e in payload.entries] == [torch.float16, torch.float16]
