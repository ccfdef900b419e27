"""Checks the codecs' decoders share: header, meta, dtypes and companion entries."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedtransfer.codecs.payload import DTYPES, Entry, Payload
from fedtransfer.errors import PayloadError
from fedtransfer.types import Params

FLOAT_DTYPES = {name: d for name, d in DTYPES.items() if d.is_floating_point}
"""Wire names of the floating dtypes a tensor may have had before a lossy codec compressed it."""

CORRUPT_HINT = "hint: the payload is corrupted or was not produced by this codec"


def is_int(value: object) -> bool:
    """Whether a JSON meta value is an integer (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_header(payload: Payload, *, codec: str, meta: Mapping[str, Any], where: str) -> None:
    """Raise unless ``payload`` was encoded by ``codec`` with payload meta ``meta``."""
    if payload.codec != codec:
        raise PayloadError(
            f"{where}: payload was encoded by codec {payload.codec!r}, expected {codec!r}; "
            "hint: check that client and server use the same codec"
        )
    if dict(payload.meta) != dict(meta):
        raise PayloadError(
            f"{where}: payload meta is {dict(payload.meta)}, expected {dict(meta)}; hint: "
            "client and server must use the same codec settings"
        )


def plain(entry: Entry, where: str, expected: Params | None = None) -> Tensor:
    """A tensor that travelled as-is; it must carry no meta (and be one ``expected``)."""
    if entry.meta:
        raise PayloadError(
            f"{where}: {entry.tensor.dtype} tensor {entry.key!r} carries meta {dict(entry.meta)}, "
            f"expected none (it travels as-is); {CORRUPT_HINT}"
        )
    check_expected(entry.key, entry.tensor.shape, entry.tensor.dtype, expected, where)
    return entry.tensor


def meta_dtype(entry: Entry, keys: frozenset[str], where: str) -> torch.dtype:
    """Check that ``entry.meta`` has exactly ``keys``; return the floating dtype it records."""
    if set(entry.meta) != keys:
        raise PayloadError(
            f"{where}: tensor {entry.key!r} has meta keys {sorted(entry.meta)}, expected "
            f"{sorted(keys)}; {CORRUPT_HINT}"
        )
    name = entry.meta["dtype"]
    if not isinstance(name, str) or name not in FLOAT_DTYPES:
        raise PayloadError(
            f"{where}: tensor {entry.key!r} records original dtype {name!r}, expected one of "
            f"{sorted(FLOAT_DTYPES)}; {CORRUPT_HINT}"
        )
    return FLOAT_DTYPES[name]


def check_finite(key: str, x: Tensor, where: str) -> None:
    """Raise if ``x`` holds NaN or ±inf (codecs that compute with the values cannot carry them)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise PayloadError(
            f"{where}: tensor {key!r} holds {int(bad.sum())} non-finite value(s) (first: "
            f"{float(x[bad].reshape(-1)[0])}), expected finite values; hint: reject or repair "
            "the update before encoding it"
        )


def companions(params: Params, suffix: str, where: str) -> None:
    """Raise if a key of ``params`` is the companion name (``key + suffix``) of a float tensor."""
    for k, v in params.items():
        if v.dtype.is_floating_point and k + suffix in params:
            raise PayloadError(
                f"{where}: key {k + suffix!r} collides with the companion entry of floating "
                f"tensor {k!r}; hint: rename it (keys ending in {suffix!r} are reserved)"
            )


def pairs(payload: Payload, suffix: str, where: str) -> Iterator[tuple[Entry, Entry | None]]:
    """Walk a payload of ``(entry, companion)`` pairs and as-is tensors, in order.

    An entry with meta must be followed by its companion ``key + suffix`` (which has none) and
    yields ``(entry, companion)``; an entry without meta is a non-floating tensor that travelled
    as-is and yields ``(entry, None)``.
    """
    entries, i = payload.entries, 0
    while i < len(entries):
        entry = entries[i]
        if not entry.meta:
            if entry.tensor.dtype.is_floating_point:
                raise PayloadError(
                    f"{where}: floating tensor {entry.key!r} carries no meta, expected the "
                    f"codec's description of it; {CORRUPT_HINT}"
                )
            yield entry, None
            i += 1
            continue
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        if nxt is None or nxt.key != entry.key + suffix or nxt.meta:
            seen = "the end of the payload" if nxt is None else f"{nxt.key!r} (meta {nxt.meta})"
            raise PayloadError(
                f"{where}: tensor {entry.key!r} is followed by {seen}, expected its companion "
                f"{entry.key + suffix!r} without meta; {CORRUPT_HINT}"
            )
        yield entry, nxt
        i += 2


def check_expected(
    key: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    expected: Params | None,
    where: str,
) -> None:
    """Refuse, before anything is allocated for it, a tensor the receiver does not expect
    (``expected``: its own tensors, e.g. the plan's shared parameters; ``None`` expects
    anything): a key it does not have, another dtype, another number of dimensions, or more
    elements than its own (fewer may come: a per-client step may widen a slice, as HetLoRA's
    rank pad does; the exact shape is validated after)."""
    if expected is None:
        return
    ref = expected.get(key)
    if ref is None:
        raise PayloadError(
            f"{where}: tensor {key!r} is not one the receiver has (it expects "
            f"{_some(list(expected))}); {CORRUPT_HINT}"
        )
    if dtype != ref.dtype:
        raise PayloadError(
            f"{where}: tensor {key!r} decodes to {dtype}, expected {ref.dtype}; {CORRUPT_HINT}"
        )
    if len(shape) != ref.dim() or math.prod(shape) > ref.numel():
        raise PayloadError(
            f"{where}: tensor {key!r} claims shape {list(shape)}, expected at most "
            f"{list(ref.shape)} ({ref.numel()} elements); {CORRUPT_HINT}"
        )


def check_keys(keys: Sequence[str], expected: Params | None, where: str) -> None:
    """Refuse a payload that lacks some of the ``expected`` keys (its extra ones are refused
    entry by entry, by :func:`check_expected`)."""
    if expected is None:
        return
    missing = [k for k in expected if k not in set(keys)]
    if missing:
        raise PayloadError(f"{where}: payload lacks tensors {_some(missing)}; {CORRUPT_HINT}")


def _some(keys: list[str]) -> str:
    return repr(keys[:5])[:-1] + (f", … {len(keys) - 5} more]" if len(keys) > 5 else "]")


CHUNK = 1 << 18
"""Elements decoded at a time by codecs that compute in float64, so their temporaries stay a
few MiB whatever the tensor's size."""


def chunked(count: int, dtype: torch.dtype, fill: Callable[[slice], Tensor]) -> Tensor:
    """A flat tensor of ``count`` elements in ``dtype``, filled ``CHUNK`` elements at a time by
    ``fill(slice)`` (elementwise arithmetic, so the result is the same as in one piece)."""
    if count <= CHUNK:
        return fill(slice(0, count)).to(dtype)
    out = torch.empty(count, dtype=dtype)
    for start in range(0, count, CHUNK):
        part = slice(start, min(start + CHUNK, count))
        out[part] = fill(part)
    return out
