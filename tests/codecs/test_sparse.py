"""TopK: kept entries exact, dropped entries no larger than any kept one, strict validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from fedtransfer import ConfigError
from fedtransfer.codecs import Payload, TopK
from fedtransfer.errors import PayloadError


def _roundtrip(codec: TopK, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return codec.decode(Payload.from_bytes(codec.encode(params).to_bytes()))


def _forge(payload: Payload, i: int, **change: Any) -> Payload:
    """``payload`` with entry ``i`` changed, through bytes (it parses; only its sense is wrong)."""
    entries = list(payload.entries)
    entries[i] = dataclasses.replace(entries[i], **change)
    return Payload.from_bytes(Payload(payload.codec, tuple(entries), payload.meta).to_bytes())


# Configuration.


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_ratio_outside_zero_one_is_a_config_error_naming_it(ratio: object) -> None:
    with pytest.raises(ConfigError, match=r"ratio must be a number in \(0, 1\], got"):
        TopK(ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ratio", "numel", "kept"),
    [
        (0.07, 100, 7),  # not 8: 0.07 * 100 == 7.000000000000001 in floating point
        (0.01, 100_000, 1000),
        (0.01, 5, 1),
        (0.3, 10, 3),
        (0.25, 10, 3),
        (1 / 3, 9, 3),
        (1e-7, 10**9, 100),
        (1.0, 17, 17),
        (1, 4, 4),
        (0.5, 0, 0),
    ],
)
def test_num_kept(ratio: float, numel: int, kept: int) -> None:
    assert TopK(ratio).num_kept(numel) == kept


def test_error_bound_is_one() -> None:
    assert TopK(0.01).error_bound == 1.0


# What is kept.


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_kept_entries_are_exact_and_dropped_ones_no_larger(
    ratio: float, dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(7, 30, generator=gen) * 10.0 ** (seed - 1)).to(dtype)
    codec = TopK(ratio)
    back = _roundtrip(codec, {"x": x})["x"]
    indices = codec.encode({"x": x}).entries[1].tensor.long()
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[indices] = True
    kept = kept.reshape(x.shape)
    assert back.dtype == dtype and back.shape == x.shape
    assert int(kept.sum()) == codec.num_kept(x.numel())
    assert torch.equal(back[kept], x[kept])
    assert bool((back[~kept] == 0).all())
    assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


def test_ties_keep_the_lowest_indices() -> None:
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    payload = TopK(0.5).encode({"x": x})
    assert payload.entries[1].tensor.tolist() == [1, 2, 4]
    zeros = TopK(0.5).encode({"z": torch.zeros(2, 3)})
    assert zeros.entries[1].tensor.tolist() == [0, 1, 2]


def test_layout_is_values_then_ascending_int32_indices() -> None:
    x = torch.tensor([[0.1, -5.0], [3.0, 0.2]])
    payload = TopK(0.5).encode({"x": x, "n": torch.tensor(2)})
    values, indices, plain = payload.entries
    assert (values.key, values.tensor.tolist(), dict(values.meta)) == (
        "x",
        [-5.0, 3.0],
        {"shape": [2, 2]},
    )
    assert (indices.key, indices.tensor.dtype, indices.tensor.tolist()) == (
        "x#indices",
        torch.int32,
        [1, 2],
    )
    assert (plain.key, dict(plain.meta)) == ("n", {})
    assert payload.meta == {"ratio": 0.5}


def test_ratio_one_roundtrips_exactly() -> None:
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(_roundtrip(TopK(1.0), {"x": x})["x"], x)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_zero_element_tensors(shape: tuple[int, ...]) -> None:
    back = _roundtrip(TopK(0.1), {"x": torch.zeros(shape)})["x"]
    assert back.shape == shape


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_raise_naming_the_tensor(value: float) -> None:
    with pytest.raises(PayloadError, match=r"'fc\.w'.*non-finite"):
        TopK(0.5).encode({"fc.w": torch.tensor([1.0, value, 0.0])})


def test_a_key_named_like_an_indices_entry_is_refused() -> None:
    with pytest.raises(PayloadError, match=r"'w#indices' collides"):
        TopK(0.5).encode({"w": torch.ones(2), "w#indices": torch.ones(2, dtype=torch.int32)})


def test_an_int_tensor_named_like_indices_travels_when_nothing_claims_it() -> None:
    params = {"v#indices": torch.tensor([3, 1], dtype=torch.int32), "w": torch.ones(3)}
    back = _roundtrip(TopK(0.5), params)
    assert torch.equal(back["v#indices"], params["v#indices"])


# Malformed payloads: they parse, but do not mean anything TopK(0.25) produces.


def _payload() -> Payload:
    x = torch.arange(1.0, 17.0).reshape(4, 4)  # keeps 13..16 at indices 12..15
    return TopK(0.25).encode({"w": x, "n": torch.tensor([1, 2])})


def _indices(values: list[int], dtype: torch.dtype = torch.int32) -> Tensor:
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([12, 14, 13, 15], "position 2, expected strictly ascending"),
        ([12, 13, 13, 15], "index 13 after 13"),
        ([12, 13, 14, 16], r"index 16, expected indices in \[0, 16\)"),
        ([-1, 13, 14, 15], r"index -1, expected indices in \[0, 16\)"),
        ([12, 13, 14, 2**31 - 1], "index 2147483647"),
    ],
    ids=["unsorted", "duplicate", "past-end", "negative", "huge"],
)
def test_decode_rejects_garbled_indices(indices: list[int], match: str) -> None:
    payload = _forge(_payload(), 1, tensor=_indices(indices))
    with pytest.raises(PayloadError, match=match):
        TopK(0.25).decode(payload)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32])
def test_decode_rejects_indices_of_another_dtype(dtype: torch.dtype) -> None:
    payload = _forge(_payload(), 1, tensor=_indices([12, 13, 14, 15], dtype))
    with pytest.raises(PayloadError, match="expected int32"):
        TopK(0.25).decode(payload)


def test_decode_rejects_more_indices_than_values() -> None:
    payload = _forge(_payload(), 1, tensor=_indices([11, 12, 13, 14, 15]))
    with pytest.raises(PayloadError, match=r"expected int32 of shape \[4\]"):
        TopK(0.25).decode(payload)


@pytest.mark.parametrize(("count", "shape"), [(3, [4, 4]), (5, [4, 4]), (4, [1000])])
def test_decode_rejects_a_count_that_is_not_k_for_the_shape(count: int, shape: list[int]) -> None:
    payload = _payload()
    forged = _forge(payload, 0, tensor=torch.ones(count), meta={"shape": shape})
    forged = _forge(forged, 1, tensor=_indices(list(range(count))))
    with pytest.raises(PayloadError, match=rf"sends {count} values, expected"):
        TopK(0.25).decode(forged)


@pytest.mark.parametrize(
    "shape",
    [[2**40], [2**16, 2**16], [-4, -4], [4.0, 4], [True, 4], "16", None, [1] * 17],
    ids=["oversized", "oversized-2d", "negative", "float", "bool", "string", "null", "17-dims"],
)
def test_decode_rejects_bad_or_oversized_shape_claims(shape: object) -> None:
    with pytest.raises(PayloadError, match="records shape"):
        TopK(0.25).decode(_forge(_payload(), 0, meta={"shape": shape}))


@pytest.mark.parametrize("meta", [{}, {"shape": [4, 4], "dtype": "float32"}, {"size": 16}])
def test_decode_rejects_meta_with_wrong_fields(meta: dict[str, Any]) -> None:
    with pytest.raises(PayloadError, match="meta"):
        TopK(0.25).decode(_forge(_payload(), 0, meta=meta))


@pytest.mark.parametrize(
    "values",
    [torch.ones(2, 2), torch.ones(4, dtype=torch.int32), torch.tensor(1.0)],
    ids=["2d", "int", "scalar"],
)
def test_decode_rejects_values_that_are_not_1d_floats(values: Tensor) -> None:
    with pytest.raises(PayloadError, match="expected 1-D floating values"):
        TopK(0.25).decode(_forge(_payload(), 0, tensor=values))


def test_decode_rejects_missing_or_renamed_indices() -> None:
    payload = _payload()
    dropped = Payload(payload.codec, payload.entries[:1] + payload.entries[2:], payload.meta)
    with pytest.raises(PayloadError, match=r"followed by 'n'.*companion 'w#indices'"):
        TopK(0.25).decode(Payload.from_bytes(dropped.to_bytes()))
    with pytest.raises(PayloadError, match=r"companion 'w#indices'"):
        TopK(0.25).decode(_forge(payload, 1, key="x#indices"))


@pytest.mark.parametrize("meta", [{}, {"ratio": 0.5}, {"ratio": 0.25, "k": 4}])
def test_decode_rejects_other_payload_meta(meta: dict[str, Any]) -> None:
    payload = _payload()
    forged = Payload.from_bytes(Payload(payload.codec, payload.entries, meta).to_bytes())
    with pytest.raises(PayloadError, match="payload meta"):
        TopK(0.25).decode(forged)


def test_decode_of_a_valid_payload() -> None:
    back = TopK(0.25).decode(_payload())
    expected = torch.zeros(16)
    expected[12:] = torch.arange(13.0, 17.0)
    assert torch.equal(back["w"], expected.reshape(4, 4))
    assert torch.equal(back["n"], torch.tensor([1, 2]))
