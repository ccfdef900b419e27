"""Wire-format specifics of :class:`fedtransfer.codecs.Payload` beyond the codec contract."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch

from fedtransfer.codecs import Entry, Float32, Payload
from fedtransfer.codecs.payload import DTYPES, MAGIC, VERSION
from fedtransfer.errors import PayloadError


def _payload() -> Payload:
    return Payload(
        "float32",
        (
            Entry("b", torch.tensor([1.0, -2.0])),
            Entry("a", torch.tensor([[7]], dtype=torch.int64), {"note": "x"}),
        ),
        {"round": 3},
    )


def test_payload_prefix_is_magic_version_and_header_length() -> None:
    data = _payload().to_bytes()
    magic, version, head_len = struct.unpack_from("<4sBI", data)
    assert (magic, version) == (b"FTPL", 1) == (MAGIC, VERSION)
    assert json.loads(data[9 : 9 + head_len])["codec"] == "float32"


def test_payload_header_describes_entries_in_order() -> None:
    data = _payload().to_bytes()
    (head_len,) = struct.unpack_from("<I", data, 5)
    header = json.loads(data[9 : 9 + head_len])
    assert header == {
        "codec": "float32",
        "meta": {"round": 3},
        "tensors": [
            {"key": "b", "dtype": "float32", "shape": [2], "meta": {}},
            {"key": "a", "dtype": "int64", "shape": [1, 1], "meta": {"note": "x"}},
        ],
    }


def test_payload_data_section_is_raw_little_endian_tensor_bytes() -> None:
    data = _payload().to_bytes()
    (head_len,) = struct.unpack_from("<I", data, 5)
    body = data[9 + head_len :]
    assert body == struct.pack("<2f", 1.0, -2.0) + struct.pack("<q", 7)


def test_payload_nbytes_is_length_of_bytes() -> None:
    payload = _payload()
    assert payload.nbytes == len(payload.to_bytes())


def test_payload_roundtrip_keeps_codec_meta_and_entry_meta() -> None:
    back = Payload.from_bytes(_payload().to_bytes())
    assert back.codec == "float32" and dict(back.meta) == {"round": 3}
    assert [(e.key, dict(e.meta)) for e in back.entries] == [("b", {}), ("a", {"note": "x"})]


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_payload_roundtrips_every_supported_dtype_bit_exactly(name: str) -> None:
    dtype = DTYPES[name]
    raw = torch.arange(48, dtype=torch.uint8).mul(37)
    if dtype == torch.bool:
        tensor = (raw % 2).bool().reshape(2, 3, 8)
    else:
        tensor = raw.view(dtype).reshape(2, -1)
    back = Payload.from_bytes(Payload("t", (Entry("x", tensor),)).to_bytes()).entries[0].tensor
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_payload_roundtrips_a_scalar_tensor() -> None:
    back = Payload.from_bytes(Payload("t", (Entry("s", torch.tensor(2.5)),)).to_bytes())
    assert back.entries[0].tensor.shape == () and float(back.entries[0].tensor) == 2.5


def test_payload_roundtrips_non_contiguous_tensors() -> None:
    t = torch.arange(6.0).reshape(2, 3).t()
    back = Payload.from_bytes(Payload("t", (Entry("w", t),)).to_bytes())
    assert torch.equal(back.entries[0].tensor, t)


def test_payload_with_no_entries_roundtrips() -> None:
    back = Payload.from_bytes(Payload("t", ()).to_bytes())
    assert back.codec == "t" and back.entries == ()


def test_payload_unsupported_dtype_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="complex64"):
        Payload("t", (Entry("z", torch.zeros(2, dtype=torch.complex64)),)).to_bytes()


def test_payload_bytes_are_deterministic() -> None:
    assert _payload().to_bytes() == _payload().to_bytes()


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_payload_from_bytes_accepts_bytes_like(wrap: type) -> None:
    back = Payload.from_bytes(wrap(_payload().to_bytes()))
    assert [e.key for e in back.entries] == ["b", "a"]


@pytest.mark.parametrize("data", ["FTPL", None, 42, [1, 2]])
def test_payload_from_bytes_rejects_non_bytes(data: object) -> None:
    with pytest.raises(PayloadError, match="must be bytes"):
        Payload.from_bytes(data)  # type: ignore[arg-type]


def test_payload_from_empty_bytes_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="truncated"):
        Payload.from_bytes(b"")


def test_payload_rejects_header_that_is_not_an_object() -> None:
    head = b"[1, 2]"
    with pytest.raises(PayloadError, match="object"):
        Payload.from_bytes(struct.pack("<4sBI", MAGIC, VERSION, len(head)) + head)


def test_payload_rejects_header_with_extra_field() -> None:
    head = json.dumps({"codec": "t", "meta": {}, "tensors": [], "extra": 1}).encode()
    with pytest.raises(PayloadError, match="exactly the keys"):
        Payload.from_bytes(struct.pack("<4sBI", MAGIC, VERSION, len(head)) + head)


@pytest.mark.parametrize(
    "spec",
    [
        {"key": "w", "dtype": "float32", "shape": [1]},
        {"key": "", "dtype": "float32", "shape": [1], "meta": {}},
        {"key": 3, "dtype": "float32", "shape": [1], "meta": {}},
        {"key": "w", "dtype": "float32", "shape": [1], "meta": []},
        "w",
    ],
    ids=["no-meta", "empty-key", "int-key", "list-meta", "string-spec"],
)
def test_payload_rejects_malformed_tensor_spec(spec: object) -> None:
    head = json.dumps({"codec": "t", "meta": {}, "tensors": [spec]}).encode()
    frame = struct.pack("<4sBI", MAGIC, VERSION, len(head)) + head + b"\x00" * 4
    with pytest.raises(PayloadError, match="tensor"):
        Payload.from_bytes(frame)


def test_payload_rejects_non_string_codec() -> None:
    head = json.dumps({"codec": 1, "meta": {}, "tensors": []}).encode()
    with pytest.raises(PayloadError, match="codec"):
        Payload.from_bytes(struct.pack("<4sBI", MAGIC, VERSION, len(head)) + head)


def _header_payload(tensors: list[dict[str, Any]], data: bytes = b"") -> bytes:
    head = json.dumps({"codec": "float32", "meta": {}, "tensors": tensors}).encode()
    return struct.pack("<4sBI", b"FTPL", 1, len(head)) + head + data


@pytest.mark.parametrize("shape", [[0, 2**63], [2**40, 2**40, 0], [2**41], [1] * 17])
def test_payload_huge_or_deep_shapes_are_payload_errors(shape):
    spec = {"key": "w", "dtype": "float32", "shape": shape, "meta": {}}
    with pytest.raises(PayloadError, match="exceeds the limits"):
        Payload.from_bytes(_header_payload([spec]))


def test_payload_bool_bytes_other_than_0_or_1_rejected():
    spec = {"key": "b", "dtype": "bool", "shape": [2], "meta": {}}
    with pytest.raises(PayloadError, match="bool bytes"):
        Payload.from_bytes(_header_payload([spec], b"\x01\x02"))


def test_payload_non_finite_header_number_rejected():
    head = b'{"codec": "float32", "meta": {"x": NaN}, "tensors": []}'
    with pytest.raises(PayloadError, match="non-finite"):
        Payload.from_bytes(struct.pack("<4sBI", b"FTPL", 1, len(head)) + head)


def _framed(head: bytes) -> bytes:
    return struct.pack("<4sBI", MAGIC, VERSION, len(head)) + head


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 16 levels"),
        (b'{"codec":"x","meta":{"a":' + b"[" * 17 + b"]" * 17 + b'},"tensors":[]}', "nests deeper"),
        (b'{"codec":"x","meta":{"n":' + b"9" * 5000 + b'},"tensors":[]}', r"5000\+ digits"),
        (
            b'{"codec":"x","meta":{},"tensors":[{"key":"w","dtype":"float32","shape":[1'
            + b"0" * 60
            + b'],"meta":{}}]}',
            "digits",
        ),
    ],
    ids=["100000-deep", "17-deep-meta", "5000-digit-int", "60-digit-dimension"],
)
def test_from_bytes_bounds_header_depth_and_number_size_before_parsing(
    head: bytes, match: str
) -> None:
    """Without the bounds, json.loads raises RecursionError or ValueError, not PayloadError."""
    with pytest.raises(PayloadError, match=match):
        Payload.from_bytes(_framed(head))


def test_from_bytes_counts_brackets_and_digits_outside_strings_only() -> None:
    """A key or codec name may hold brackets and digits: only the JSON's own shape counts."""
    key = "[" * 40 + "9" * 60
    payload = Payload.from_bytes(Float32().encode({key: torch.ones(2)}).to_bytes())
    assert Float32().decode(payload)[key].tolist() == [1.0, 1.0]
