"""Checks the codecs' decoders share: header, meta, dtypes and companion entries."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


def plain(entry: Entry, where: str) -> Tensor:
    """A tensor that travelled as-is; it must carry no meta."""
    if entry.meta:
        raise PayloadError(
            f"{where}: {entry.tensor.dtype} tensor {entry.key!r} carries meta {dict(entry.meta)}, "
            f"expected none (it travels as-is); {CORRUPT_HINT}"
        )
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
