"""Seeded mutations of valid payload bytes, to check that a receiver refuses every malformed
payload cleanly (``benchmarks/fuzz.py``, ``tests/codecs/test_fuzz.py``).

Each mutation is a pure function of ``(payload bytes, random.Random)``: bit flips, truncation,
extension, and edits of the JSON header — huge, negative or non-integer shapes, deep nesting,
numbers of thousands of digits, ``NaN`` / ``Infinity`` literals, unknown dtypes, duplicate and
unicode keys, a wrong header length — and of the tensor data (NaN and inf bytes).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

_PREFIX = struct.Struct("<4sBI")

Mutation = Callable[[bytes, random.Random], bytes]


def _split(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    _, _, head_len = _PREFIX.unpack_from(data)
    head = data[_PREFIX.size : _PREFIX.size + head_len]
    return data[: _PREFIX.size], json.loads(head), data[_PREFIX.size + head_len :]


def _join(prefix: bytes, head: bytes, body: bytes, *, head_len: int | None = None) -> bytes:
    magic, version, _ = _PREFIX.unpack(prefix)
    length = len(head) if head_len is None else head_len
    return _PREFIX.pack(magic, version, length) + head + body


def _with_header(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    prefix, header, body = _split(data)
    edited = edit(header)
    head = edited if isinstance(edited, bytes) else json.dumps(header).encode()
    return _join(prefix, head, body)


def _a_tensor(header: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    specs = header["tensors"]
    return specs[rng.randrange(len(specs))] if specs else {}


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def extend(data: bytes, rng: random.Random) -> bytes:
    return data + rng.randbytes(rng.choice((1, 3, 8, 64, 4096)))


def huge_shape(data: bytes, rng: random.Random) -> bytes:
    def edit(header: dict[str, Any]) -> None:
        spec = _a_tensor(header, rng)
        if spec:
            spec["shape"] = rng.choice(
                ([1 << 30], [1 << 62], [1 << 20, 1 << 20], [2] * 40, [-1], [1.5], ["3"], [True])
            )
        meta = spec.get("meta") if spec else None
        if isinstance(meta, dict) and "shape" in meta:  # a sparse tensor's dense shape
            meta["shape"] = rng.choice(([1 << 30], [1 << 62], [-5], [1 << 31, 2]))

    return _with_header(data, edit)


def deep(data: bytes, rng: random.Random) -> bytes:
    depth = rng.choice((17, 100, 1000, 100_000))
    return _with_header(
        data, lambda h: json.dumps(h)[:-1].encode() + b',"x":' + b"[" * depth + b"]" * depth + b"}"
    )


def long_number(data: bytes, rng: random.Random) -> bytes:
    number = "9" * rng.choice((41, 400, 5000, 50_000))

    def edit(header: dict[str, Any]) -> bytes:
        text = json.dumps(header)
        if '"shape": [' in text and rng.random() < 0.5:  # in a shape
            return text.replace('"shape": [', f'"shape": [{number}, ', 1).encode()
        return (text[:-1] + f', "n": {number}}}').encode()

    return _with_header(data, edit)


def non_finite(data: bytes, rng: random.Random) -> bytes:
    literal = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999"))
    return _with_header(data, lambda h: json.dumps(h)[:-1].encode() + b', "v": ' + literal + b"}")


def bad_dtype(data: bytes, rng: random.Random) -> bytes:
    def edit(header: dict[str, Any]) -> None:
        spec = _a_tensor(header, rng)
        if spec:
            spec["dtype"] = rng.choice(("float128", "", "object", 3, None, "int8", "bool"))

    return _with_header(data, edit)


def duplicate_key(data: bytes, rng: random.Random) -> bytes:
    def edit(header: dict[str, Any]) -> bytes | None:
        if not header["tensors"]:
            return None
        spec = _a_tensor(header, rng)
        if rng.random() < 0.5:  # the same tensor key twice
            header["tensors"].append(dict(spec))
            return None
        text = json.dumps(header)  # the same JSON key twice in one object
        return text.replace('"codec":', '"codec": "other", "codec":', 1).encode()

    return _with_header(data, edit)


def unicode_key(data: bytes, rng: random.Random) -> bytes:
    def edit(header: dict[str, Any]) -> bytes | None:
        spec = _a_tensor(header, rng)
        if not spec:
            return None
        choice = rng.randrange(4)
        if choice == 3:  # a lone surrogate: valid JSON escape, not encodable text
            return json.dumps(header).replace(json.dumps(spec["key"]), '"w\\ud800"', 1).encode()
        spec["key"] = (spec["key"] + "\u0000", "\u00e9" + spec["key"], "\U0001f600", "")[choice]
        return None

    return _with_header(data, edit)


def wrong_header_length(data: bytes, rng: random.Random) -> bytes:
    prefix, header, body = _split(data)
    head = json.dumps(header).encode()
    return _join(
        prefix, head, body, head_len=rng.choice((0, len(head) - 1, len(head) + 7, 1 << 31))
    )


_NON_FINITE = {
    # wire dtype: (item size, little-endian NaN / +inf / -inf patterns)
    "float32": (4, (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff")),
    "float64": (8, (b"\x00" * 6 + b"\xf8\x7f", b"\x00" * 6 + b"\xf0\x7f")),
    "float16": (2, (b"\x00\x7e", b"\x00\x7c", b"\x00\xfc")),
    "bfloat16": (2, (b"\xc0\x7f", b"\x80\x7f", b"\x80\xff")),
}
_SIZES = {"int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def poison_values(data: bytes, rng: random.Random) -> bytes:
    """NaN or inf written over whole elements of the floating tensors' data."""
    prefix, header, body = _split(data)
    floats, at = [], 0
    for spec in header["tensors"]:
        dtype = spec["dtype"]
        size = _NON_FINITE[dtype][0] if dtype in _NON_FINITE else _SIZES.get(dtype, 1)
        count = 1
        for d in spec["shape"]:
            count *= d
        if dtype in _NON_FINITE and count:
            floats.append((at, count, dtype))
        at += count * size
    if not floats:
        return flip_bits(data, rng)
    out = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        start, count, dtype = rng.choice(floats)
        size, patterns = _NON_FINITE[dtype]
        i = start + size * rng.randrange(count)
        out[i : i + size] = rng.choice(patterns)
    return _join(prefix, json.dumps(header).encode(), bytes(out))


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": flip_bits,
    "truncate": truncate,
    "extend": extend,
    "huge_shape": huge_shape,
    "deep": deep,
    "long_number": long_number,
    "non_finite": non_finite,
    "bad_dtype": bad_dtype,
    "duplicate_key": duplicate_key,
    "unicode_key": unicode_key,
    "wrong_header_length": wrong_header_length,
    "poison_values": poison_values,
}
"""Every mutation by name; :func:`mutations` draws from them in turn."""


def mutations(data: bytes, count: int, *, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` mutated copies of ``data``, cycling through :data:`MUTATIONS`, seeded; made
    one at a time (10,000 copies of a real update would not fit in memory at once)."""
    rng = random.Random(seed)
    names = list(MUTATIONS)
    for i in range(count):
        name = names[i % len(names)]
        yield name, MUTATIONS[name](data, rng)


def fuzz(codec: Any, update: dict[str, Any], *, count: int, seed: int) -> dict[str, Any]:
    """``count`` mutations of ``codec.encode(update)``, each read as a server reads an update:
    ``Payload.from_bytes`` ▸ ``codec.decode(payload, expected=update)`` ▸
    :func:`~fedtransfer.server.validate.validate_update`. Returns how many were tried, refused
    (a ``PayloadError`` or ``UpdateRejected``), accepted (still a valid update: a flipped bit
    in a value, an index or a code — what a client could have sent anyway; no decoder can tell
    it from training without an integrity code, which the transport's TLS provides), and ended
    any other way (``other``, with the first few as examples)."""
    from fedtransfer.codecs.payload import Payload
    from fedtransfer.errors import PayloadError, UpdateRejected
    from fedtransfer.server.validate import validate_update

    base = codec.encode(update).to_bytes()
    counts: dict[str, Any] = {"tried": 0, "rejected": 0, "accepted": 0, "other": 0}
    examples: list[str] = []
    by_kind: dict[str, int] = {}
    accepted_by_kind: dict[str, int] = {}
    for kind, data in mutations(base, count, seed=seed):
        counts["tried"] += 1
        by_kind[kind] = by_kind.get(kind, 0) + 1
        try:
            decoded = codec.decode(Payload.from_bytes(data), update)
            validate_update(decoded, 10, reference=update, client="fuzz", round=1)
        except (PayloadError, UpdateRejected):
            counts["rejected"] += 1
        except Exception as exc:
            counts["other"] += 1
            if len(examples) < 5:
                examples.append(f"{kind}: {exc!r}"[:300])
        else:
            counts["accepted"] += 1
            accepted_by_kind[kind] = accepted_by_kind.get(kind, 0) + 1
    return {
        **counts,
        "by_kind": by_kind,
        "accepted_by_kind": accepted_by_kind,
        "examples": examples,
    }
