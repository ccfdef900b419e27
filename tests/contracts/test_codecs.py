"""Contract suite for codecs: bounded round trip, exact byte counts, malformed bytes rejected."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch
from torch import Tensor

from fedtransfer import Codec, Float32, Payload, PayloadError, tree
from fedtransfer.codecs import Entry, Exact

CODECS: list[Codec] = [Float32(), Exact()]
LOSSLESS: list[Codec] = [c for c in CODECS if c.error_bound == 0]


@pytest.fixture(params=CODECS, ids=repr)
def codec(request: pytest.FixtureRequest) -> Codec:
    return request.param


def _params(seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=gen),
        "fc.weight": torch.randn(5, 3, generator=gen).t(),  # non-contiguous
        "fc.bias": torch.randn(5, generator=gen) * 1e6,
        "scale": torch.tensor(0.5),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
    }


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


def _within_bound(codec: Codec, original: Tensor, decoded: Tensor) -> bool:
    if not original.dtype.is_floating_point:
        return torch.equal(original, decoded)
    scale = float(original.abs().max()) if original.numel() else 0.0
    err = float((decoded.double() - original.double()).abs().max()) if original.numel() else 0.0
    return err <= codec.error_bound * scale


def test_codec_is_a_codec(codec: Codec) -> None:
    assert isinstance(codec, Codec)


def test_codec_roundtrip_within_error_bound(codec: Codec) -> None:
    params = _params()
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert decoded.keys() == params.keys()
    for k, v in params.items():
        assert decoded[k].shape == v.shape
        assert _within_bound(codec, v, decoded[k]), k


@pytest.mark.parametrize("codec", LOSSLESS, ids=repr)
def test_codec_lossless_roundtrip_is_bit_exact(codec: Codec) -> None:
    params = _params()
    decoded = codec.decode(Payload.from_bytes(_wire(codec, params)))
    assert tree.equal(decoded, {k: v.contiguous() for k, v in params.items()})


def test_codec_decode_without_bytes_roundtrip(codec: Codec) -> None:
    params = _params()
    decoded = codec.decode(codec.encode(params))
    assert all(_within_bound(codec, v, decoded[k]) for k, v in params.items())


def test_codec_nbytes_equals_length_of_bytes(codec: Codec) -> None:
    payload = codec.encode(_params())
    assert payload.nbytes == len(payload.to_bytes())


def test_codec_encode_is_deterministic(codec: Codec) -> None:
    assert _wire(codec, _params()) == _wire(codec, _params())


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
    data = _wire(codec, _params())
    with pytest.raises(PayloadError, match="magic"):
        Payload.from_bytes(b"XTPL" + data[4:])


def test_codec_rejects_wrong_version(codec: Codec) -> None:
    data = _wire(codec, _params())
    with pytest.raises(PayloadError, match="version"):
        Payload.from_bytes(data[:4] + bytes([2]) + data[5:])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 4, b"garbage"])
def test_codec_rejects_trailing_bytes(codec: Codec, extra: bytes) -> None:
    data = _wire(codec, _params())
    with pytest.raises(PayloadError, match="trailing"):
        Payload.from_bytes(data + extra)


def test_codec_rejects_garbled_json_header(codec: Codec) -> None:
    header, body = _split(_wire(codec, _params()))
    head = json.dumps(header).encode()
    garbled = head[:10] + b"}{" + head[12:]
    with pytest.raises(PayloadError, match="JSON"):
        Payload.from_bytes(_frame(garbled, body))


def test_codec_rejects_non_utf8_header(codec: Codec) -> None:
    _, body = _split(_wire(codec, _params()))
    with pytest.raises(PayloadError, match="UTF-8"):
        Payload.from_bytes(_frame(b"\xff\xfe{}", body))


def test_codec_rejects_unknown_dtype(codec: Codec) -> None:
    header, body = _split(_wire(codec, _params()))
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
    header, body = _split(_wire(codec, _params()))
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
