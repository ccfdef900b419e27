"""Client transforms: steps on a client's update between training and the uplink encoder.

A :class:`ClientTransform` sees the update (local − global) and its own per-client state,
which the client keeps across rounds (it lives in the client's memory, checkpointed with the
run, never sent). Stateful compression lives here, not in the codecs, which stay pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fedtransfer.codecs.base import Codec
from fedtransfer.types import Out, Params, State


@runtime_checkable
class ClientTransform(Protocol):
    """``apply(update, state, uplink=codec) -> Out(update', state', metrics)``, pure.

    ``state`` is what this transform kept on this client from its previous participation
    (empty the first time); ``uplink`` is the codec that will encode the result.
    """

    def apply(self, update: Params, state: State, *, uplink: Codec) -> Out[dict[str, Tensor]]:
        """The update to encode, and the state to keep."""


@dataclass(frozen=True)
class ErrorFeedback:
    """Error feedback (EF-SGD, Karimireddy et al., arXiv 1901.09847; Seide et al. 2014):
    what the uplink codec dropped last time is added to the next update.

    The client sends ``c = update + residual`` through the codec and keeps
    ``residual' = c − decode(encode(c))``, so compression error is delayed, never lost — what
    makes aggressive sparsification (``TopK(0.01)``) converge. With a lossless codec the residual
    stays zero and the transform changes nothing. Only floating tensors carry a residual.

    >>> import torch
    >>> from fedtransfer.codecs import Float32
    >>> out = ErrorFeedback().apply({"w": torch.ones(2)}, {}, uplink=Float32())
    >>> out.value["w"], out.state["w"]
    (tensor([1., 1.]), tensor([0., 0.]))
    """

    def apply(self, update: Params, state: State, *, uplink: Codec) -> Out[dict[str, Tensor]]:
        corrected = {
            k: v + state[k] if k in state and v.dtype.is_floating_point else v
            for k, v in update.items()
        }
        sent = uplink.decode(uplink.encode(corrected))
        residual = {
            k: (v - sent[k].to(v.dtype)).detach()
            for k, v in corrected.items()
            if v.dtype.is_floating_point
        }
        norm = torch.sqrt(
            sum((r.double() ** 2).sum() for r in residual.values()) or torch.zeros(())
        )
        return Out(corrected, residual, {"residual_norm": float(norm)})
