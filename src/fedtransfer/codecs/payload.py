"""The wire format: a validated, self-describing byte string of named tensors.

Layout (all integers little-endian)::

    b"FTPL" | version: u8 | header_len: u32 | header: UTF-8 JSON | data: raw tensor bytes

The header is ``{"codec": str, "meta": {...}, "tensors": [{"key", "dtype", "shape", "meta"}, ...]}``
and the data section is the tensors' bytes, in header order, with nothing before, between or
after them. :meth:`Payload.from_bytes` checks every one of these facts and raises
:class:`~fedtransfer.errors.PayloadError` naming the first that fails. ``nbytes`` is the exact
length of :meth:`Payload.to_bytes`; byte counts are never estimated.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedtransfer.errors import PayloadError

MAGIC = b"FTPL"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_DIMS = 16
MAX_ELEMENTS = 1 << 40
MAX_HEADER_DEPTH = 16
"""How deeply a header's JSON may nest (a real one nests 4 deep: header ▸ tensors ▸ spec ▸ meta)."""
MAX_NUMBER_DIGITS = 40
"""The longest run of digits a header's number may have (a shape of ``MAX_ELEMENTS`` has 13;
a float's repr, 17 and its exponent)."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")
_DIGITS = re.compile(rb"[0-9]{%d,}" % (MAX_NUMBER_DIGITS + 1))

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; unsupported dtypes are an error."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise PayloadError(
            f"dtype {dtype} cannot travel; supported dtypes are {sorted(DTYPES)}"
        ) from None


@dataclass(frozen=True)
class Entry:
    """One named tensor of a payload, with codec-specific metadata (scales, indices' shape …)."""

    key: str
    tensor: Tensor
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Payload:
    """What a codec produces: named tensors plus the codec name and metadata.

    >>> import torch
    >>> p = Payload("float32", (Entry("w", torch.ones(2)),))
    >>> q = Payload.from_bytes(p.to_bytes())
    >>> q.codec, q.entries[0].key, q.nbytes == len(p.to_bytes())
    ('float32', 'w', True)
    """

    codec: str
    entries: tuple[Entry, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def _bytes(self) -> bytes:
        head = _header_bytes(self)
        parts: list[bytes | memoryview] = [_PREFIX.pack(MAGIC, VERSION, len(head)), head]
        for e in self.entries:
            t = e.tensor
            if not t.numel():
                continue
            if t.dtype in _NUMPY and not t.requires_grad and t.is_cpu and t.is_contiguous():
                parts.append(t.numpy().data)  # its bytes (join copies them once)
                continue
            t = t.detach().contiguous().cpu()
            parts.append(t.reshape(-1).view(torch.uint8).numpy().data)
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        """The payload as it travels."""
        return self._bytes

    @property
    def nbytes(self) -> int:
        """Exactly ``len(self.to_bytes())``."""
        return len(self._bytes)

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        """Parse and validate bytes produced by :meth:`to_bytes`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) < _PREFIX.size:
            raise PayloadError(
                f"payload truncated: {len(data)} bytes, shorter than the {_PREFIX.size}-byte prefix"
            )
        magic, version, head_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise PayloadError(f"not a fedtransfer payload: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise PayloadError(f"payload version {version} unsupported; this build reads {VERSION}")
        if head_len > MAX_HEADER_BYTES:
            raise PayloadError(
                f"payload header length {head_len} exceeds the {MAX_HEADER_BYTES}-byte limit "
                "(garbled payload)"
            )
        if head_len > len(data) - _PREFIX.size:
            raise PayloadError(
                f"payload header length {head_len} exceeds the {len(data) - _PREFIX.size} bytes "
                "that follow the prefix (truncated or garbled payload)"
            )
        start = _PREFIX.size + head_len
        header, layout = _parse_header_cached(data[_PREFIX.size : start])
        entries, offset = [], start
        run: list[Tensor] = []  # decoded tensors of the current run, still to hand out
        for i, (key, dtype, shape, count, size, wire, meta) in enumerate(layout):
            if offset + size > len(data):
                raise PayloadError(
                    f"payload truncated: tensor {key!r} needs {size} bytes at offset "
                    f"{offset}, only {len(data) - offset} remain"
                )
            if wire is not None:  # read in the numpy dtype: aligned, one copy per run
                if not run:
                    run = _read_run(data, layout, i, offset)
                tensor = run.pop()
            elif count == 0:
                tensor = torch.empty(shape, dtype=dtype)
            else:
                raw = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).copy()
                if dtype == torch.bool and bool((raw > 1).any()):
                    raise PayloadError(f"payload tensor {key!r}: bool bytes must be 0 or 1")
                tensor = torch.from_numpy(raw).view(dtype).reshape(shape)
            entries.append(Entry(key, tensor, meta))
            offset += size
        if offset != len(data):
            raise PayloadError(
                f"payload has {len(data) - offset} unexpected trailing bytes after the last "
                "tensor (oversized or garbled payload)"
            )
        return cls(header["codec"], tuple(entries), MappingProxyType(header["meta"]))


def _read_run(data: bytes, layout: tuple[Any, ...], i: int, offset: int) -> list[Tensor]:
    """The tensors ``layout[i:]`` that follow each other from ``offset`` in one wire dtype,
    decoded with one copy: views of it laid end to end (see :func:`fedtransfer.tree.flat`),
    in reverse order (``pop`` hands them out)."""
    wire = layout[i][5]
    end, views = offset, []
    total = 0
    for _key, _dtype, shape, count, size, w, _meta in layout[i:]:
        if w is not wire or end + size > len(data):
            break
        views.append((shape, _strides(shape), total))
        total += count
        end += size
    flat = torch.from_numpy(np.frombuffer(data, dtype=wire, count=total, offset=offset).copy())
    return [flat.as_strided(shape, strides, at) for shape, strides, at in reversed(views)]


@functools.lru_cache(maxsize=1024)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides for ``shape``."""
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


_NUMPY: dict[torch.dtype, Any] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
}
"""Dtypes numpy shares with torch, bit for bit (not bool: its bytes are checked one by one;
not bfloat16)."""

_Layout = tuple[tuple[str, torch.dtype, tuple[int, ...], int, int, Any, Mapping[str, Any]], ...]
"""Per tensor of a header: key, dtype, shape, element count, byte size, numpy dtype (or
``None``) and its meta."""


_HEADERS: OrderedDict[object, bytes] = OrderedDict()
_PARSED: OrderedDict[bytes, tuple[dict[str, Any], _Layout]] = OrderedDict()
_KEEP_HEADERS = 64
_headers_lock = threading.Lock()


def _remember(cache: OrderedDict[Any, Any], key: object, value: Any) -> None:
    with _headers_lock:
        cache[key] = value
        while len(cache) > _KEEP_HEADERS:
            cache.popitem(last=False)


def _header_bytes(payload: Payload) -> bytes:
    """The JSON header of ``payload``. A round sends many payloads of one layout (every
    client's update): headers without meta are remembered by layout."""
    layout: object = None
    if not payload.meta and not any(e.meta for e in payload.entries):
        layout = (
            payload.codec,
            tuple((e.key, e.tensor.dtype, tuple(e.tensor.shape)) for e in payload.entries),
        )
        hit = _HEADERS.get(layout)
        if hit is not None:
            return hit
    header = {
        "codec": payload.codec,
        "meta": dict(payload.meta),
        "tensors": [
            {
                "key": e.key,
                "dtype": dtype_name(e.tensor.dtype),
                "shape": list(e.tensor.shape),
                "meta": dict(e.meta),
            }
            for e in payload.entries
        ],
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if layout is not None:
        _remember(_HEADERS, layout, head)
    return head


def _parse_header_cached(raw: bytes) -> tuple[dict[str, Any], _Layout]:
    """:func:`_parse_header` and its tensors' layout, remembered by the header's bytes (a
    round's updates share one layout). Both are only read, never changed, by ``from_bytes``."""
    hit = _PARSED.get(raw)
    if hit is not None:
        return hit
    header = _parse_header(raw)
    layout: _Layout = tuple(
        (
            spec["key"],
            DTYPES[spec["dtype"]],
            tuple(spec["shape"]),
            math.prod(spec["shape"]),
            math.prod(spec["shape"]) * DTYPES[spec["dtype"]].itemsize,
            _NUMPY.get(DTYPES[spec["dtype"]]),
            MappingProxyType(spec["meta"]),
        )
        for spec in header["tensors"]
    )
    _remember(_PARSED, raw, (header, layout))
    return header, layout


def _check_shape_of_json(raw: bytes) -> None:
    """Refuse, before parsing, a header nested deeper than :data:`MAX_HEADER_DEPTH` or holding
    a number of more than :data:`MAX_NUMBER_DIGITS` digits (outside its strings): either would
    make the JSON parser itself fail (a ``RecursionError``, Python's integer digit limit)."""
    bare = _STRING.sub(b'""', raw)
    depth = deepest = 0
    for bracket in _BRACKETS.findall(bare):
        depth += 1 if bracket in (b"[", b"{") else -1
        deepest = max(deepest, depth)
        if deepest > MAX_HEADER_DEPTH:
            raise PayloadError(
                f"payload header nests deeper than {MAX_HEADER_DEPTH} levels (garbled payload)"
            )
    long = _DIGITS.search(bare)
    if long is not None:
        raise PayloadError(
            f"payload header holds a number of {len(long.group())}+ digits, more than the "
            f"{MAX_NUMBER_DIGITS} any real header has (garbled payload)"
        )


def _parse_header(raw: bytes) -> dict[str, Any]:
    _check_shape_of_json(raw)
    try:
        header = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_twins
        )
    except (UnicodeDecodeError, json.JSONDecodeError, PayloadError) as exc:
        raise PayloadError(f"payload header is not valid UTF-8 JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # bounded above; a last line of defence
        raise PayloadError(f"payload header cannot be parsed: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"codec", "meta", "tensors"}:
        raise PayloadError(
            "payload header must be an object with exactly the keys codec, meta, tensors; "
            f"got {sorted(header) if isinstance(header, dict) else type(header).__name__}"
        )
    if not isinstance(header["codec"], str) or not isinstance(header["meta"], dict):
        raise PayloadError("payload header: 'codec' must be a string and 'meta' an object")
    if not isinstance(header["tensors"], list):
        raise PayloadError("payload header: 'tensors' must be a list")
    seen: set[str] = set()
    for i, spec in enumerate(header["tensors"]):
        _check_spec(i, spec, seen)
    return header


def _no_twins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if it names a key twice (parsers disagree on which one counts)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twin = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise PayloadError(f"payload header names the key {twin!r} twice in one object")
    return out


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"non-finite number {name} in the header")


def _check_spec(i: int, spec: Any, seen: set[str]) -> None:
    if not isinstance(spec, dict) or set(spec) != {"key", "dtype", "shape", "meta"}:
        raise PayloadError(f"payload header: tensor #{i} must have keys key, dtype, shape, meta")
    key, dtype, shape = spec["key"], spec["dtype"], spec["shape"]
    if not isinstance(key, str) or not key:
        raise PayloadError(
            f"payload header: tensor #{i} key must be a non-empty string, got {key!r}"
        )
    if key in seen:
        raise PayloadError(f"payload header: duplicate tensor key {key!r}")
    seen.add(key)
    if dtype not in DTYPES:
        raise PayloadError(
            f"payload header: tensor {key!r} dtype {dtype!r} not in {sorted(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise PayloadError(
            f"payload header: tensor {key!r} shape {shape!r} is not a list of ints >= 0"
        )
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise PayloadError(
            f"payload header: tensor {key!r} shape {shape!r} exceeds the limits of {MAX_DIMS} "
            f"dimensions and {MAX_ELEMENTS} elements"
        )
    if not isinstance(spec["meta"], dict):
        raise PayloadError(f"payload header: tensor {key!r} meta must be an object")
