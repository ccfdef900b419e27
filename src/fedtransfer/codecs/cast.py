"""Codecs that send every tensor as-is in one floating dtype (``Float32``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedtransfer.codecs.payload import Entry, Payload
from fedtransfer.errors import PayloadError
from fedtransfer.types import Params


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
