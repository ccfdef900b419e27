"""Shared value types: parameter mappings, metrics, the ``Out`` triple of stateful steps, and
the one protocol of a step on an update (:class:`UpdateTransform`, with its
:class:`UpdateContext`), used on both sides of a round."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from fedtransfer.codecs.base import Codec

Params = Mapping[str, Tensor]
"""Tensors keyed by ``state_dict`` key (parameters and buffers alike)."""

State = dict[str, Tensor]
"""Component state: a flat mapping of tensors, so it round-trips through safetensors."""

Metrics = dict[str, float]
"""Scalar measurements, namespaced ``stage/component/name`` by the spine."""

Label = Literal["frozen", "shared", "local"]
"""What a state-dict key does in a federation (see :class:`fedtransfer.transfer.ParamPlan`)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Out(Generic[T]):
    """Result of a stateful step: the value, the new state and what was measured.

    State is data handed back to the caller, never an attribute mutated on the component.
    """

    value: T
    state: State = field(default_factory=dict)
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class UpdateContext:
    """Where an :class:`UpdateTransform` runs: ``params``, the global shared parameters the
    update is relative to; ``client``, whose update it is (``None`` for a step on the
    aggregate); ``uplink``, the codec that will encode the result (set on the client only).

    A client transform (``Recipe.client_transforms``) gets all three, a per-client server step
    (``ServerPipeline.per_client``) ``params`` and ``client``, a post step (``post``) ``params``.
    """

    params: Params
    client: str | None = None
    uplink: Codec | None = None


@runtime_checkable
class UpdateTransform(Protocol):
    """A one-to-one step on an update, the same protocol on both sides of a round:
    ``init(params) -> state`` and ``apply(update, state, ctx) -> Out(update', state', metrics)``,
    pure (state is data handed back, never an attribute changed).

    On a client the state is what the transform kept on that client from its previous
    participation (``init`` the first time; client memory, never sent); on the server it is
    the pipeline's state for that step."""

    def init(self, params: Params) -> State:
        """Initial state for shared parameters ``params``."""

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        """The transformed update and the new state."""


@runtime_checkable
class StartStep(Protocol):
    """A step on the weights a client holds, before it trains (``Recipe.client_start``):
    ``apply(weights, ctx) -> weights``, pure, given every state-dict key; ``ctx.params`` are
    the global shared keys as received. HetLoRA's narrowing of a client's adapter to its own
    rank is one (:class:`fedtransfer.transfer.ranks.RankNarrow`)."""

    def apply(self, weights: Params, ctx: UpdateContext) -> dict[str, Tensor]:
        """The weights this client trains from."""


def needs_of(transform: object) -> frozenset[str]:
    """What ``transform`` needs of its :class:`UpdateContext` beyond ``params`` (its class's
    ``needs``, e.g. ``{"uplink"}`` for error feedback), so a recipe can refuse a step placed
    where that is not given."""
    return frozenset(getattr(type(transform), "needs", ()))
