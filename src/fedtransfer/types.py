"""Shared value types: parameter mappings, metrics and the ``Out`` triple of stateful steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from torch import Tensor

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
