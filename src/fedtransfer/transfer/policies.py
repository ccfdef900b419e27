"""Transfer policies: ordered selector rules over one grammar (see :mod:`.select`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedtransfer.errors import PlanError
from fedtransfer.transfer.plan import LABELS, ParamPlan
from fedtransfer.transfer.select import select
from fedtransfer.types import Label


@dataclass(frozen=True)
class Rules:
    """Ordered ``(selector, label)`` rules; the first rule that matches a key labels it.

    Keys matched by no rule get ``default``. A rule that matches nothing is an error that
    lists near-miss key names, so typos fail before round 1.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> plan = Rules(rules=(("1", "shared"),), default="frozen").plan(net)
    >>> plan.shared, plan.frozen
    (('1.weight', '1.bias'), ('0.weight', '0.bias'))
    """

    rules: tuple[tuple[str, Label], ...] = ()
    default: Label = "frozen"

    def __post_init__(self) -> None:
        for selector, label in self.rules:
            if label not in LABELS:
                raise PlanError(f"Rules: label {label!r} for {selector!r} is not one of {LABELS}")
        if self.default not in LABELS:
            raise PlanError(f"Rules: default {self.default!r} is not one of {LABELS}")

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        labels: dict[str, Label] = {}
        for selector, label in self.rules:
            for key in select(model, selector):
                labels.setdefault(key, label)
        for key in model.state_dict():
            labels.setdefault(key, self.default)
        return ParamPlan.for_model(model, labels)


@dataclass(frozen=True)
class Full:
    """Every key shared: plain FedAvg fine-tuning of the whole model (McMahan et al., arXiv 1602.05629)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        return Rules(default="shared").plan(model)


@dataclass(frozen=True)
class HeadOnly:
    """Only the head trains and travels; the pre-trained body is frozen (linear probing).

    ``head`` is a selector; ``"head"`` means the model's last block.
    """

    head: str = "head"

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        return Rules(rules=((self.head, "shared"),), default="frozen").plan(model)


@dataclass(frozen=True)
class LastK:
    """The last ``k`` blocks train and travel; earlier blocks stay frozen."""

    k: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise PlanError(f"LastK: k must be an integer >= 1, got {self.k!r}")

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        return Rules(rules=((f"last:{self.k}", "shared"),), default="frozen").plan(model)


@dataclass(frozen=True)
class LocalBatchNorm:
    """FedBN (Li et al., arXiv 2102.07623): BatchNorm weights and statistics stay local."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        try:
            return Rules(rules=(("type:_BatchNorm", "local"),), default="shared").plan(model)
        except PlanError as exc:
            raise PlanError(
                f"LocalBatchNorm (FedBN) needs BatchNorm layers, and this model has none ({exc}); "
                "use Full() or add BatchNorm to the model"
            ) from None


@dataclass(frozen=True)
class PersonalHead:
    """FedPer (Arivazhagan et al., arXiv 1912.00818): the head stays local, the body is shared."""

    head: str = "head"

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        return Rules(rules=((self.head, "local"),), default="shared").plan(model)


@dataclass(frozen=True)
class GlobalHead:
    """LG-FedAvg (Liang et al., arXiv 2001.01523): local representations, a global head.

    The body (everything but ``head``) stays with each client; only the head is federated.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> GlobalHead().plan(net).shared
    ('1.weight', '1.bias')
    """

    head: str = "head"

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        return Rules(rules=((self.head, "shared"),), default="local").plan(model)


@dataclass(frozen=True)
class FrozenHead:
    """FedBABU (Oh et al., arXiv 2106.06042): the body is federated under a frozen head.

    The head keeps its starting (random or pre-trained) weights throughout federated training;
    it adapts only at evaluation (personalised fine-tuning, ``Personalization``).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> FrozenHead().plan(net).frozen
    ('1.weight', '1.bias')
    """

    head: str = "head"

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        return Rules(rules=((self.head, "frozen"),), default="shared").plan(model)
