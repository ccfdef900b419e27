"""Client transforms: steps on a client's update between training and the uplink encoder.

A client transform is an :class:`~fedtransfer.types.UpdateTransform` (the one protocol of
both sides) in ``Recipe.client_transforms``: it sees the update (local − global), its
context (the client, the global parameters, the uplink codec) and its own per-client state,
which the client keeps across rounds (in the client's memory, checkpointed with the run,
never sent). Stateful compression lives here, not in the codecs, which stay pure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedtransfer.errors import ConfigError
from fedtransfer.types import Out, Params, State, UpdateContext, UpdateTransform

__all__ = ["ErrorFeedback"]


def __getattr__(name: str) -> Any:
    """``ClientTransform``, the former name of the one transform protocol, with a warning."""
    if name == "ClientTransform":
        warnings.warn(
            "ClientTransform is now fedtransfer.UpdateTransform (one protocol for both sides; "
            "apply(update, state, ctx) with ctx.uplink the codec)",
            DeprecationWarning,
            stacklevel=2,
        )
        return UpdateTransform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    >>> from fedtransfer.types import UpdateContext
    >>> ctx = UpdateContext({}, client="c0", uplink=Float32())
    >>> out = ErrorFeedback().apply({"w": torch.ones(2)}, {}, ctx)
    >>> out.value["w"], out.state["w"]
    (tensor([1., 1.]), tensor([0., 0.]))
    """

    needs: ClassVar[tuple[str, ...]] = ("uplink",)

    def init(self, params: Params) -> State:
        return {}

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        uplink = ctx.uplink
        if uplink is None:
            raise ConfigError(
                "ErrorFeedback: no uplink codec in its context; it is a client transform "
                "(Recipe.client_transforms), not a server step"
            )
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
