"""The ``Codec`` protocol: pure ``encode(params) -> Payload`` and ``decode(payload) -> Params``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from fedtransfer.codecs.payload import Payload
from fedtransfer.types import Params


@runtime_checkable
class Codec(Protocol):
    """Turns parameters into a :class:`Payload` and back.

    ``decode`` validates everything it reads and raises
    :class:`~fedtransfer.errors.PayloadError` on anything unexpected. Given ``expected`` (the
    receiver's own tensors for these keys: the plan's shared parameters on the server), it
    refuses a key the receiver does not have, another dtype or more elements than its own
    *before* allocating anything for it, so a payload's claims cannot make it allocate more
    than the update it should be. ``error_bound`` is the
    declared round-trip bound on ``|decode(encode(x)) - x|``, relative to each tensor's largest
    magnitude (0 for lossless codecs).
    """

    @property
    def error_bound(self) -> float:
        """Declared relative round-trip error bound."""

    def encode(self, params: Params) -> Payload:
        """Encode ``params`` for the wire."""

    def decode(self, payload: Payload, expected: Params | None = None) -> dict[str, Tensor]:
        """Decode and validate ``payload`` (against ``expected``, when given)."""
