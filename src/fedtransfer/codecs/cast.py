"""Codecs that cast each tensor to one wire dtype, and the dtype bookkeeping lossy codecs share.

Wire layout of ``Float16`` and ``BFloat16``: one entry per tensor, in ``params`` order, no payload
meta. Integer and bool tensors travel as-is, without meta. A floating tensor travels in the wire
dtype with meta ``{"dtype": <its own dtype>, "exp": e}`` and decodes to ``wire * 2**e`` in its
own dtype. ``e`` is 0 unless the tensor's largest finite magnitude is below the wire dtype's
smallest normal number; then the tensor is first multiplied (exactly) by ``2**-e`` to bring that
magnitude into [1, 2), since flushing a tensor of tiny values (a small update) to subnormals or
zero would break the relative bound. NaN and ±inf travel as they are (the server's update
validation rejects them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedtransfer.codecs.payload import DTYPES, Entry, Payload, dtype_name
from fedtransfer.errors import PayloadError
from fedtransfer.types import Params

FLOAT_DTYPES = {name: d for name, d in DTYPES.items() if d.is_floating_point}
"""Wire names of the floating dtypes a tensor may have had before a lossy codec compressed it."""

_MIN_EXP = -1074  # float64's smallest subnormal is 2**-1074
CORRUPT_HINT = "hint: the payload is corrupted or was not produced by this codec"


@dataclass(frozen=True)
class Exact:
    """Every tensor travels in its own dtype, bit for bit (used for the set-up distribution).

    >>> import torch
    >>> codec = Exact()
    >>> codec.decode(codec.encode({"w": torch.ones(2, dtype=torch.float64)}))["w"].dtype
    torch.float64
    """

    @property
    def error_bound(self) -> float:
        return 0.0

    def encode(self, params: Params) -> Payload:
        return Payload("exact", tuple(Entry(k, v.detach()) for k, v in params.items()))

    def decode(self, payload: Payload) -> dict[str, Tensor]:
        check_header(payload, codec="exact", meta={}, where="Exact.decode")
        return {e.key: plain(e, "Exact.decode") for e in payload.entries}


@dataclass(frozen=True)
class Float32:
    """Lossless for float32 models: floating tensors travel as float32, integer tensors as-is.

    >>> import torch
    >>> codec = Float32()
    >>> payload = codec.encode({"w": torch.arange(3.0)})
    >>> codec.decode(payload)["w"], payload.nbytes == len(payload.to_bytes())
    (tensor([0., 1., 2.]), True)
    """

    @property
    def error_bound(self) -> float:
        return 0.0

    def encode(self, params: Params) -> Payload:
        entries = tuple(
            Entry(k, v.detach().to(torch.float32) if v.dtype.is_floating_point else v.detach())
            for k, v in params.items()
        )
        return Payload("float32", entries)

    def decode(self, payload: Payload) -> dict[str, Tensor]:
        check_header(payload, codec="float32", meta={}, where="Float32.decode")
        for e in payload.entries:
            if e.tensor.dtype.is_floating_point and e.tensor.dtype != torch.float32:
                raise PayloadError(
                    f"Float32.decode: tensor {e.key!r} is stored as {e.tensor.dtype}, expected "
                    f"torch.float32; {CORRUPT_HINT}"
                )
        return {e.key: plain(e, "Float32.decode") for e in payload.entries}


@dataclass(frozen=True)
class _Narrow:
    """Floating tensors travel in a 16-bit float dtype (layout in the module docstring)."""

    _wire: ClassVar[torch.dtype]
    _name: ClassVar[str]
    _unit: ClassVar[float]
    _instead: ClassVar[str]

    @property
    def error_bound(self) -> float:
        return self._unit

    def encode(self, params: Params) -> Payload:
        entries = tuple(
            self._narrow(k, v.detach()) if v.dtype.is_floating_point else Entry(k, v.detach())
            for k, v in params.items()
        )
        return Payload(self._name, entries)

    def decode(self, payload: Payload) -> dict[str, Tensor]:
        where = f"{type(self).__name__}.decode"
        check_header(payload, codec=self._name, meta={}, where=where)
        out: dict[str, Tensor] = {}
        for e in payload.entries:
            if not e.tensor.dtype.is_floating_point:
                out[e.key] = plain(e, where)
                continue
            if e.tensor.dtype != self._wire:
                raise PayloadError(
                    f"{where}: tensor {e.key!r} is stored as {e.tensor.dtype}, expected "
                    f"{self._wire}; {CORRUPT_HINT}"
                )
            dtype = meta_dtype(e, frozenset({"dtype", "exp"}), where)
            exp = e.meta["exp"]
            if not is_int(exp) or not _MIN_EXP <= exp <= 0:
                raise PayloadError(
                    f"{where}: tensor {e.key!r} has exponent {exp!r}, expected an integer in "
                    f"[{_MIN_EXP}, 0]; {CORRUPT_HINT}"
                )
            out[e.key] = restore(e.tensor.double() * 2.0**exp, dtype)
        return out

    def _narrow(self, key: str, x: Tensor) -> Entry:
        info = torch.finfo(self._wire)
        finite = x[torch.isfinite(x)]
        top = float(finite.abs().max()) if finite.numel() else 0.0
        if top > info.max:
            raise PayloadError(
                f"{type(self).__name__}.encode: tensor {key!r} holds the value {top:.6g}, beyond "
                f"the {dtype_name(self._wire)} range ±{info.max:.6g}; hint: {self._instead}"
            )
        exp = math.frexp(top)[1] - 1 if 0 < top < info.tiny else 0
        wire = narrow(_times_pow2(x, -exp), self._wire)
        return Entry(key, wire, {"dtype": dtype_name(x.dtype), "exp": exp})


@dataclass(frozen=True)
class Float16(_Narrow):
    """Floating tensors travel as IEEE float16 (half the bytes of float32); the rest as-is.

    Rounding to nearest moves each value by at most ``2**-11`` times the tensor's largest
    magnitude (``error_bound``), and each normal-range value by at most ``2**-11`` of itself.
    A finite value beyond ±65504 cannot travel, and :meth:`encode` raises rather than send inf:
    use :class:`BFloat16`. A tensor whose largest magnitude is below 2**-14 is scaled by an exact
    power of two first, so that small updates keep their precision (the problem loss scaling
    solves in Micikevicius et al., *Mixed Precision Training*, arXiv:1710.03740).

    >>> import torch
    >>> codec = Float16()
    >>> x = torch.tensor([1.0, 1e-3, 2e-9])
    >>> back = codec.decode(codec.encode({"w": x, "n": torch.tensor(7)}))
    >>> back["w"].dtype, back["n"].item(), bool((back["w"] - x).abs().max() <= 2**-11)
    (torch.float32, 7, True)
    """

    _wire: ClassVar[torch.dtype] = torch.float16
    _name: ClassVar[str] = "float16"
    _unit: ClassVar[float] = 2.0**-11
    _instead: ClassVar[str] = "use BFloat16, which has float32's range, or Float32"


@dataclass(frozen=True)
class BFloat16(_Narrow):
    """Floating tensors travel as bfloat16 (float32's range, 8 significant bits); the rest as-is.

    Rounding to nearest moves each value by at most ``2**-8`` times the tensor's largest
    magnitude (``error_bound``). Only values beyond ±3.39e38 (the top of float32's range, or
    float64) cannot travel, and :meth:`encode` raises for them. See Kalamkar et al., *A Study of
    BFLOAT16 for Deep Learning Training*, arXiv:1905.12322.

    >>> import torch
    >>> codec = BFloat16()
    >>> back = codec.decode(codec.encode({"w": torch.tensor([3.0, 1e6])}))["w"]
    >>> back.dtype, back.tolist()
    (torch.float32, [3.0, 999424.0])
    """

    _wire: ClassVar[torch.dtype] = torch.bfloat16
    _name: ClassVar[str] = "bfloat16"
    _unit: ClassVar[float] = 2.0**-8
    _instead: ClassVar[str] = "use Float32 or Exact"


def _times_pow2(x: Tensor, exp: int) -> Tensor:
    """``x * 2**exp``, exact in ``x``'s dtype: two steps, as ``2**exp`` alone may overflow it."""
    if exp == 0:
        return x
    half = exp // 2
    return x * 2.0**half * 2.0 ** (exp - half)


def narrow(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast ``values`` to ``dtype`` with a single rounding to nearest.

    torch casts float64 to float16/bfloat16 through float32, which rounds twice; rounding to
    float32 *to odd* first makes the second rounding correct (Boldo & Melquiond, *Emulation of
    FMA and correctly rounded sums: proved algorithms using rounding to odd*, 2008).
    """
    if values.dtype != torch.float64 or dtype not in (torch.float16, torch.bfloat16):
        return values.to(dtype)
    near = values.to(torch.float32)
    inexact = (near.double() != values) & torch.isfinite(values)
    even = (near.view(torch.int32) & 1) == 0
    toward = torch.where(values > near.double(), math.inf, -math.inf).to(torch.float32)
    return torch.where(inexact & even, torch.nextafter(near, toward), near).to(dtype)


def restore(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast decoded float64 ``values`` back to the tensor's own ``dtype``.

    Finite values saturate at the dtype's largest finite number (a value rounded up to just past
    it on the wire, e.g. float16's 65504 sent as bfloat16 65536, must not come back as inf).
    """
    top = torch.finfo(dtype).max
    return narrow(torch.where(torch.isfinite(values), values.clamp(-top, top), values), dtype)


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
