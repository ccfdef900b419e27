"""``ParamPlan`` (every state-dict key labelled frozen / shared / local) and the policy protocol."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from fedtransfer.errors import PlanError
from fedtransfer.types import Label

LABELS: tuple[Label, ...] = ("frozen", "shared", "local")


@dataclass(frozen=True)
class ParamPlan:
    """Labels for every state-dict key of a model, parameters and buffers alike.

    * ``frozen`` — pre-trained, never trained, never sent after set-up;
    * ``shared`` — trained, communicated, aggregated;
    * ``local`` — trained (or updated, for buffers), kept per client.

    ``parameters`` names the keys that are ``nn.Parameter``s; only those get gradients.
    """

    labels: Mapping[str, Label]
    parameters: frozenset[str]

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.labels.items() if v not in LABELS}
        if bad:
            raise PlanError(f"ParamPlan: labels must be one of {LABELS}; got {bad}")
        stray = sorted(self.parameters - set(self.labels))
        if stray:
            raise PlanError(f"ParamPlan: parameters {stray[:5]} have no label")

    @classmethod
    def for_model(cls, model: nn.Module, labels: Mapping[str, Label]) -> ParamPlan:
        """Build a plan for ``model``, checking every state-dict key is labelled exactly once."""
        keys = list(model.state_dict())
        missing = [k for k in keys if k not in labels]
        extra = [k for k in labels if k not in set(keys)]
        if missing or extra:
            raise PlanError(f"ParamPlan: unlabelled keys {missing[:5]}, unknown keys {extra[:5]}")
        params = frozenset(name for name, _ in model.named_parameters())
        return cls({k: labels[k] for k in keys}, params)

    def keys(self, label: Label) -> tuple[str, ...]:
        """Keys with ``label``, in state-dict order."""
        return tuple(k for k, v in self.labels.items() if v == label)

    @cached_property
    def shared(self) -> tuple[str, ...]:
        return self.keys("shared")

    @cached_property
    def local(self) -> tuple[str, ...]:
        return self.keys("local")

    @cached_property
    def frozen(self) -> tuple[str, ...]:
        return self.keys("frozen")

    @cached_property
    def trainable(self) -> frozenset[str]:
        """Parameters that get gradients: shared or local ``nn.Parameter``s."""
        return frozenset(k for k in self.parameters if self.labels[k] != "frozen")

    def held(
        self,
        start: Mapping[str, Tensor],
        stored: Mapping[str, Tensor] | None = None,
        *,
        lacks: Collection[str] = (),
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The frozen and local weights a client holds: frozen keys from its starting weights
        ``start``, local keys from what it ``stored`` (its own, trained) or else from
        ``start``. Keys in ``lacks`` (a hand-over it has yet to decode) and keys ``start``
        does not hold are left out. The one place a client's weights are assembled (simulator,
        deployed client, client update, evaluation); the round's global shared keys go on top.

        >>> import torch
        >>> plan = ParamPlan({"a": "frozen", "b": "local", "c": "shared"}, frozenset())
        >>> start = {k: torch.zeros(1) for k in "abc"}
        >>> frozen, local = plan.held(start, {"b": torch.ones(1)})
        >>> sorted(frozen), local["b"]
        (['a'], tensor([1.]))
        """
        missing = set(lacks)
        frozen = {k: start[k] for k in self.frozen if k in start and k not in missing}
        local = {k: start[k] for k in self.local if k in start and k not in missing}
        if stored:
            local.update({k: v for k, v in stored.items() if self.labels.get(k) == "local"})
        return frozen, local

    def only(self, keys: Iterable[str]) -> ParamPlan:
        """This plan with every key outside ``keys`` relabelled ``frozen`` (a training phase:
        FedRep's head and body epochs, fine-tuning part of a model)."""
        keep = set(keys)
        unknown = sorted(keep - set(self.labels))
        if unknown:
            raise PlanError(f"ParamPlan.only: unknown keys {unknown[:5]}")
        labels: dict[str, Label] = {
            k: (v if k in keep else "frozen") for k, v in self.labels.items()
        }
        return ParamPlan(labels, self.parameters)

    def describe(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """Count of keys and of scalars per label, e.g. for a report."""
        sd = model.state_dict()
        return {
            label: {
                "keys": len(self.keys(label)),
                "numel": sum(sd[k].numel() for k in self.keys(label)),
            }
            for label in LABELS
        }


@runtime_checkable
class TransferPolicy(Protocol):
    """Decides what trains and what travels.

    ``prepare`` makes structural edits (e.g. injecting adapters) and is idempotent;
    ``plan`` labels every state-dict key of the prepared model.
    """

    def prepare(self, model: nn.Module) -> nn.Module:
        """Return the model ready for this policy (idempotent)."""

    def plan(self, model: nn.Module) -> ParamPlan:
        """Label every state-dict key of ``model``."""
