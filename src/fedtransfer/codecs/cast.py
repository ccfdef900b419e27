"""Codecs that send tensors as-is: ``Exact`` (own dtype) and ``Float32`` (floats as float32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedtransfer.codecs.payload import Entry, Payload
from fedtransfer.errors import PayloadError
from fedtransfer.types import Params


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
        if payload.codec != "exact":
            raise PayloadError(
                f"Exact.decode: payload was encoded by codec {payload.codec!r}, expected 'exact'"
            )
        if payload.meta or any(e.meta for e in payload.entries):
            raise PayloadError("Exact.decode: unexpected meta in the payload")
        return {e.key: e.tensor for e in payload.entries}


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
        if payload.codec != "float32":
            raise PayloadError(
                f"Float32.decode: payload was encoded by codec {payload.codec!r}, expected "
                "'float32'; check that client and server use the same codec"
            )
        if payload.meta:
            raise PayloadError(f"Float32.decode: unexpected payload meta {dict(payload.meta)}")
        out: dict[str, Tensor] = {}
        for e in payload.entries:
            if e.tensor.dtype.is_floating_point and e.tensor.dtype != torch.float32:
                raise PayloadError(
                    f"Float32.decode: tensor {e.key!r} has dtype {e.tensor.dtype}, expected float32"
                )
            if e.meta:
                raise PayloadError(
                    f"Float32.decode: tensor {e.key!r} carries unexpected meta {e.meta}"
                )
            out[e.key] = e.tensor
        return out
