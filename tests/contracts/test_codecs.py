"""Contract suite for codecs: bounded round trip, exact byte counts, malformed bytes rejected."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import torch
from torch import Tensor

from fedtransfer import Codec, tree
from fedtransfer.codecs import BFloat16, Entry, Exact, Float16, Float32, Int8, Payload, TopK
from fedtransfer.errors import PayloadError

CODECS: list[Codec] = [
    Float32(),
    Exact(),
    Float16(),
    BFloat16(),
    Int8(),
    Int8("channel"),
    Int8(stochastic=True, seed=7),
    Int8("channel", stochastic=True),
    TopK(0.1),
    TopK(1.0),
]
LOSSLESS: list[Codec] = [c for c in CODECS if c.error_bound == 0]
# Float32 sends (and returns) floats as float32 by design; every other codec returns each tensor
# in its own dtype.
KEEPS_DTYPE: list[Codec] = [c for c in CODECS if not isinstance(c, Float32)]
# Codecs that compute with the values (a range, a ranking) refuse NaN and inf at encode; the
# others carry them as-is for the server's update validation to reject.
REFUSE_NON_FINITE = (Int8, TopK)


@pytest.fixture(params=CODECS, ids=repr)
def codec(request: pytest.FixtureRequest) -> Codec:
    return request.param


def _params(codec: Codec | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Mixed parameters; ``codec`` narrows the magnitudes to its domain (float16: |x| <= 65504)."""
    gen = torch.Generator().manual_seed(seed)
    big = 1e4 if isinstance(codec, Float16) else 1e6
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=gen),
        "fc.weight": torch.randn(5, 3, generator=gen).t(),  # non-contiguous
        "fc.bias": torch.randn(5, generator=gen) * big,
        "tiny": torch.randn(7, generator=gen) * 1e-9,  # below float16's normal range
        "scale": torch.tensor(0.5),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
    }


def _same_wire(a: Codec, b: Codec) -> bool:
    """Whether ``b`` may decode what ``a`` encodes (stochastic rounding changes no layout)."""
    if isinstance(a, Int8) and isinstance(b, Int8):
        return a.granularity == b.granularity
    return a == b


def _wire(codec: Codec, params: dict[str, Tensor]) -> bytes:
    return codec.encode(params).to_bytes()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and the data section of valid payload bytes."""
    _, _, head_len = struct.unpack_from("<4sBI", data)
    return json.loads(data[9 : 9 + head_len]), data[9 + head_len :]


def _frame(
    header: dict[str, Any] | bytes,
    body: bytes,
    *,
    magic: bytes = b"FTPL",
    version: int = 1,
    head_len: int | None = None,
) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(head) if head_len is None else head_len
    return struct.pack("<4sBI", magic, version, length) + head + body


def _within_bound(codec: Codec, original: Tensor, decoded: Tensor, slack: float = 0.0) -> bool:
    if not original.dtype.is_floating_point:
        return torch.equal(original, decoded)
    scale = float(original.abs().max()) if original.numel() else 0.0
    err = float((decoded.double() - original.double()).abs().max()) if original.numel() else 0.0
    return err <= (codec.error_bound + slack) * scale


def test_codec_is_a_codec(codec: Codec) -> None:
    """The protocol's members behave: a declared bound in [0, 1], and ``decode`` takes the
    :class:`Payload` that ``encode`` returns (no bytes in between) back to the same keys and
    shapes, within that bound (exactly for a lossless codec)."""
    assert isinstance(codec, Codec)
    bound = codec.error_bound
    assert isinstance(bound, float) and 0.0 <= bound <= 1.0
    params = _params(codec)
    payload = codec.encode(params)
    assert isinstance(payload, Payload)
    decoded = codec.decode(payload)
    assert isinstance(decoded, dict) and list(decoded) == list(params)
    for k, v in params.items():
        assert isinstance(decoded[k], Tensor) and decoded[k].shape == v.shape, k
        assert _within_bound(codec, v, decoded[k], slack=1e-6), k
        if bound == 0:
            assert torch.equal(decoded[k].to(v.dtype), v), k


def test_codec_roundtrip_within_error_bound(codec: Codec) -> None:
    params = _params(codec)
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert list(decoded) == list(params)
    for k, v in params.items():
        assert (decoded[k].shape, decoded[k].dtype) == (v.shape, v.dtype), k
        assert _within_bound(codec, v, decoded[k]), k


@pytest.mark.parametrize("codec", LOSSLESS, ids=repr)
def test_codec_lossless_roundtrip_is_bit_exact(codec: Codec) -> None:
    params = _params(codec)
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert tree.equal(decoded, {k: v.contiguous() for k, v in params.items()})


def test_codec_decode_without_bytes_roundtrip(codec: Codec) -> None:
    params = _params(codec)
    decoded = codec.decode(codec.encode(params))
    assert all(_within_bound(codec, v, decoded[k]) for k, v in params.items())


def test_codec_nbytes_equals_length_of_bytes(codec: Codec) -> None:
    payload = codec.encode(_params(codec))
    assert payload.nbytes == len(payload.to_bytes())


def test_codec_encode_is_deterministic(codec: Codec) -> None:
    assert _wire(codec, _params(codec)) == _wire(codec, _params(codec))


def test_codec_int64_tensors_roundtrip_exactly(codec: Codec) -> None:
    params = {"count": torch.tensor([0, -1, 2**62, -(2**62)], dtype=torch.int64)}
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert tree.equal(decoded, params)


def test_codec_empty_params_roundtrip(codec: Codec) -> None:
    decoded = codec.decode(Payload.from_bytes(_wire(codec, {})))
    assert decoded == {}


def test_codec_zero_element_tensors_roundtrip(codec: Codec) -> None:
    params = {
        "a": torch.ones(2),
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(3, 0),
        "b": torch.full((2,), 3.0),
    }
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert decoded.keys() == params.keys()
    assert all(decoded[k].shape == v.shape for k, v in params.items())
    assert all(_within_bound(codec, v, decoded[k]) for k, v in params.items())


def test_codec_rejects_every_truncation(codec: Codec) -> None:
    data = _wire(codec, {"w": torch.arange(3.0), "n": torch.tensor([1], dtype=torch.int64)})
    for cut in range(len(data)):
        with pytest.raises(PayloadError):
            codec.decode(Payload.from_bytes(data[:cut]))


def test_codec_rejects_wrong_magic(codec: Codec) -> None:
    data = _wire(codec, _params(codec))
    with pytest.raises(PayloadError, match="magic"):
        Payload.from_bytes(b"XTPL" + data[4:])


def test_codec_rejects_wrong_version(codec: Codec) -> None:
    data = _wire(codec, _params(codec))
    with pytest.raises(PayloadError, match="version"):
        Payload.from_bytes(data[:4] + bytes([2]) + data[5:])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 4, b"garbage"])
def test_codec_rejects_trailing_bytes(codec: Codec, extra: bytes) -> None:
    data = _wire(codec, _params(codec))
    with pytest.raises(PayloadError, match="trailing"):
        Payload.from_bytes(data + extra)


def test_codec_rejects_garbled_json_header(codec: Codec) -> None:
    header, body = _split(_wire(codec, _params(codec)))
    head = json.dumps(header).encode()
    garbled = head[:10] + b"}{" + head[12:]
    with pytest.raises(PayloadError, match="JSON"):
        Payload.from_bytes(_frame(garbled, body))


def test_codec_rejects_non_utf8_header(codec: Codec) -> None:
    _, body = _split(_wire(codec, _params(codec)))
    with pytest.raises(PayloadError, match="UTF-8"):
        Payload.from_bytes(_frame(b"\xff\xfe{}", body))


def test_codec_rejects_unknown_dtype(codec: Codec) -> None:
    header, body = _split(_wire(codec, _params(codec)))
    header["tensors"][0]["dtype"] = "float128"
    with pytest.raises(PayloadError, match="dtype"):
        Payload.from_bytes(_frame(header, body))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [2.0], [True], "3", None])
def test_codec_rejects_invalid_shape(codec: Codec, shape: object) -> None:
    header, body = _split(_wire(codec, {"w": torch.ones(2)}))
    header["tensors"][0]["shape"] = shape
    with pytest.raises(PayloadError, match="shape"):
        Payload.from_bytes(_frame(header, body))


def test_codec_rejects_duplicate_keys(codec: Codec) -> None:
    header, body = _split(_wire(codec, {"a": torch.ones(2), "b": torch.ones(2)}))
    header["tensors"][1]["key"] = "a"
    with pytest.raises(PayloadError, match="duplicate"):
        Payload.from_bytes(_frame(header, body))


def test_codec_rejects_header_length_larger_than_data(codec: Codec) -> None:
    header, body = _split(_wire(codec, _params(codec)))
    head = json.dumps(header).encode()
    with pytest.raises(PayloadError, match="header length"):
        Payload.from_bytes(_frame(head, body, head_len=len(head) + len(body) + 1))


def test_codec_rejects_shape_larger_than_data(codec: Codec) -> None:
    header, body = _split(_wire(codec, {"w": torch.ones(4)}))
    header["tensors"][0]["shape"] = [2**40]
    with pytest.raises(PayloadError, match="truncated"):
        Payload.from_bytes(_frame(header, body))


@pytest.mark.parametrize("field", ["codec", "meta", "tensors"])
def test_codec_rejects_header_missing_a_field(codec: Codec, field: str) -> None:
    header, body = _split(_wire(codec, {"w": torch.ones(2)}))
    del header[field]
    with pytest.raises(PayloadError, match="header"):
        Payload.from_bytes(_frame(header, body))


def test_codec_rejects_payload_of_another_codec(codec: Codec) -> None:
    payload = codec.encode({"w": torch.ones(3)})
    foreign = Payload(f"not-{payload.codec}", payload.entries, payload.meta)
    with pytest.raises(PayloadError, match="codec"):
        codec.decode(Payload.from_bytes(foreign.to_bytes()))


@pytest.mark.parametrize("seed", range(5))
def test_codec_roundtrip_within_error_bound_across_magnitudes(codec: Codec, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = {
        f"m{e}": (torch.randn(6, 5, generator=gen) + offset) * 10.0**e
        for e in (-30, -12, -6, -3, 0, 3)
        for offset in (0.0, 3.0)
    }
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert all(_within_bound(codec, v, decoded[k]) for k, v in params.items())


@pytest.mark.parametrize("codec", KEEPS_DTYPE, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_codec_decodes_every_floating_dtype_to_itself(codec: Codec, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    params = {
        "w": torch.randn(3, 4, generator=gen).to(dtype),
        "v": torch.randn(5, generator=gen).to(dtype),
    }
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert all(
        (decoded[k].dtype, decoded[k].shape) == (v.dtype, v.shape) for k, v in params.items()
    )
    # One more rounding to the tensor's own dtype is allowed (documented for Int8).
    slack = torch.finfo(dtype).eps
    assert all(_within_bound(codec, v, decoded[k], slack) for k, v in params.items())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool])
def test_codec_non_floating_tensors_travel_as_is(codec: Codec, dtype: torch.dtype) -> None:
    params = {"x": torch.tensor([[0, 1], [1, 0]]).to(dtype), "w": torch.ones(2)}
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert torch.equal(decoded["x"], params["x"]) and decoded["x"].dtype == dtype


def test_codec_encode_does_not_modify_its_input(codec: Codec) -> None:
    params = _params(codec)
    before = {k: v.clone() for k, v in params.items()}
    codec.encode(params).to_bytes()
    assert tree.equal(params, before)


def test_codec_encode_leaves_the_global_rng_alone(codec: Codec) -> None:
    state = torch.random.get_rng_state()
    codec.encode(_params(codec)).to_bytes()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_codec_non_finite_values_raise_or_travel_as_is(codec: Codec) -> None:
    params = {"ok": torch.ones(2), "bad": torch.tensor([1.0, math.nan, math.inf, -math.inf])}
    if isinstance(codec, REFUSE_NON_FINITE):
        with pytest.raises(PayloadError, match=r"'bad'.*non-finite"):
            codec.encode(params)
        return
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))["bad"]
    assert torch.equal(decoded.isnan(), params["bad"].isnan())
    assert decoded[2:].tolist() == [math.inf, -math.inf] and decoded[0] == 1.0


CROSS = [(a, b) for a in CODECS for b in CODECS if not _same_wire(a, b)]


@pytest.mark.parametrize(("encoder", "decoder"), CROSS, ids=[f"{a!r}->{b!r}" for a, b in CROSS])
def test_codec_rejects_what_a_different_codec_encoded(encoder: Codec, decoder: Codec) -> None:
    params = {"w": torch.randn(4, 3), "n": torch.tensor([3], dtype=torch.int64)}
    with pytest.raises(PayloadError, match="codec"):
        decoder.decode(Payload.from_bytes(_wire(encoder, params)))


@pytest.mark.parametrize(
    ("codec", "low", "high"),
    [
        (Float16(), 0.49, 0.51),
        (BFloat16(), 0.49, 0.51),
        (Int8(), 0.0, 0.27),
        (Int8("channel"), 0.0, 0.27),
        (Int8(stochastic=True), 0.0, 0.27),
        (TopK(0.01), 0.0, 0.03),
    ],
    ids=repr,
)
def test_codec_compression_is_real(codec: Codec, low: float, high: float) -> None:
    params = {"w": torch.randn(100, 1000, generator=torch.Generator().manual_seed(0))}
    ratio = codec.encode(params).nbytes / Float32().encode(params).nbytes
    assert low < ratio < high


def test_float32_decode_rejects_other_floating_dtypes() -> None:
    payload = Payload("float32", (Entry("w", torch.ones(2, dtype=torch.float64)),))
    with pytest.raises(PayloadError, match="float64"):
        Float32().decode(payload)


def test_float32_decode_rejects_entry_meta() -> None:
    payload = Payload("float32", (Entry("w", torch.ones(2), {"scale": 2.0}),))
    with pytest.raises(PayloadError, match="meta"):
        Float32().decode(payload)


def test_float32_encode_sends_floating_tensors_as_float32() -> None:
    payload = Float32().encode({"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(1)})
    assert [e.tensor.dtype for e in payload.entries] == [torch.float32, torch.int64]


# --- decode against what the receiver expects ------------------------------------------------


def _expected(codec: Codec) -> dict[str, Tensor]:
    """What a receiver of ``_params`` holds: its tensors in their own dtypes (Float32 sends
    floating tensors as float32)."""
    params = _params(codec)
    if isinstance(codec, Float32):
        return {k: v.float() if v.dtype.is_floating_point else v for k, v in params.items()}
    return params


def test_codec_decode_with_expected_returns_what_it_returns_without(codec: Codec) -> None:
    payload = codec.encode(_params(codec))
    assert tree.equal(codec.decode(payload, _expected(codec)), codec.decode(payload))


def test_codec_decode_refuses_a_key_the_receiver_does_not_have(codec: Codec) -> None:
    params = {**_params(codec), "bogus": torch.ones(3)}
    with pytest.raises(PayloadError, match=r"'bogus' is not one the receiver has"):
        codec.decode(codec.encode(params), _expected(codec))


def test_codec_decode_refuses_a_payload_that_lacks_an_expected_key(codec: Codec) -> None:
    params = _params(codec)
    del params["fc.bias"]
    with pytest.raises(PayloadError, match=r"lacks tensors \['fc.bias'\]"):
        codec.decode(codec.encode(params), _expected(codec))


def test_codec_decode_refuses_more_elements_or_another_rank_than_expected(codec: Codec) -> None:
    expected = _expected(codec)
    for wrong in (torch.randn(5, 3), torch.randn(4, 2, 3, 3, 2), torch.randn(4, 2, 3, 4)):
        params = {**_params(codec), "conv.weight": wrong}
        with pytest.raises(PayloadError, match=r"'conv.weight' claims shape"):
            codec.decode(codec.encode(params), expected)


def test_codec_decode_accepts_fewer_elements_for_a_per_client_step_to_widen(codec: Codec) -> None:
    """A HetLoRA slice is smaller than the global tensor; the exact shape is validated later."""
    params = {**_params(codec), "conv.weight": torch.randn(2, 2, 3, 3)}
    out = codec.decode(codec.encode(params), _expected(codec))
    assert out["conv.weight"].shape == (2, 2, 3, 3)


def test_codec_decode_refuses_another_dtype_than_expected(codec: Codec) -> None:
    expected = {**_expected(codec), "bn.num_batches_tracked": torch.tensor(1, dtype=torch.int32)}
    with pytest.raises(PayloadError, match=r"decodes to torch.int64, expected torch.int32"):
        codec.decode(codec.encode(_params(codec)), expected)
