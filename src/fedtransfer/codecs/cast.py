"""Codecs that cast each tensor to one wire dtype, and the rounding lossy codecs share.

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
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedtransfer.codecs.checks import (
    CORRUPT_HINT,
    check_expected,
    check_header,
    check_keys,
    chunked,
    is_int,
    meta_dtype,
    plain,
)
from fedtransfer.codecs.payload import Entry, Payload, dtype_name
from fedtransfer.errors import PayloadError
from fedtransfer.types import Params

_MIN_EXP = -1074  # float64's smallest subnormal is 2**-1074


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

    def decode(self, payload: Payload, expected: Params | None = None) -> dict[str, Tensor]:
        check_header(payload, codec="exact", meta={}, where="Exact.decode")
        check_keys([e.key for e in payload.entries], expected, "Exact.decode")
        return {e.key: plain(e, "Exact.decode", expected) for e in payload.entries}


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
        entries: list[Entry] = []
        for k, v in params.items():
            if v.requires_grad:
                v = v.detach()
            if v.dtype.is_floating_point and v.dtype != torch.float32:
                v = v.to(torch.float32)
            entries.append(Entry(k, v))
        return Payload("float32", tuple(entries))

    def decode(self, payload: Payload, expected: Params | None = None) -> dict[str, Tensor]:
        check_header(payload, codec="float32", meta={}, where="Float32.decode")
        check_keys([e.key for e in payload.entries], expected, "Float32.decode")
        for e in payload.entries:
            if e.tensor.dtype.is_floating_point and e.tensor.dtype != torch.float32:
                raise PayloadError(
                    f"Float32.decode: tensor {e.key!r} is stored as {e.tensor.dtype}, expected "
                    f"torch.float32; {CORRUPT_HINT}"
                )
        return {e.key: plain(e, "Float32.decode", expected) for e in payload.entries}


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

    def decode(self, payload: Payload, expected: Params | None = None) -> dict[str, Tensor]:
        where = f"{type(self).__name__}.decode"
        check_header(payload, codec=self._name, meta={}, where=where)
        check_keys([e.key for e in payload.entries], expected, where)
        out: dict[str, Tensor] = {}
        for e in payload.entries:
            if not e.tensor.dtype.is_floating_point:
                out[e.key] = plain(e, where, expected)
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
            check_expected(e.key, e.tensor.shape, dtype, expected, where)
            out[e.key] = _widened(e.tensor, exp, dtype)
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


def _widened(wire: Tensor, exp: int, dtype: torch.dtype) -> Tensor:
    """``wire · 2**exp`` in ``dtype``, computed in float64 a chunk at a time."""
    flat, unit = wire.reshape(-1), 2.0**exp
    return chunked(
        flat.numel(), dtype, lambda part: restore(flat[part].double() * unit, dtype)
    ).reshape(wire.shape)


def restore(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast decoded float64 ``values`` back to the tensor's own ``dtype``.

    Finite values saturate at the dtype's largest finite number (a value rounded up to just past
    it on the wire, e.g. float16's 65504 sent as bfloat16 65536, must not come back as inf).
    """
    top = torch.finfo(dtype).max
    return narrow(torch.where(torch.isfinite(values), values.clamp(-top, top), values), dtype)
