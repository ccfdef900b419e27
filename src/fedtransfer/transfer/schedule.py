"""Staged transfer schedules: which policy (and objective, local training) holds in which round.

``Stages((Stage(5, HeadOnly()), Stage(None, Full())))`` is linear probing then fine-tuning
(LP→FT, Kumar et al., arXiv 2202.10054). A ``Stages`` is itself a policy: its ``prepare`` makes
every stage's structural edits up front (so a LoRA stage's adapters exist from round 1, as zero
deltas), and the round loop asks :func:`stage_recipe` for the recipe of the current round.

When a stage begins, the server rebases: keys shared so far keep their aggregated values in
the starting weights, the server and objective state restart for the new shared keys, and the
clients' objective memory and transform state restart. A client that holds starting weights
from an earlier stage receives, on its first participation in the new stage, the current values
of every key that was shared since and is not shared now (a *hand-over*, counted as downlink
bytes). Keys that leave ``local`` restart from the starting weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import Tensor, nn

from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.client.objectives import Objective
from fedtransfer.client.train import LocalTraining
from fedtransfer.codecs import Codec, Float32
from fedtransfer.errors import ConfigError
from fedtransfer.transfer.plan import ParamPlan, PerClientRank, TransferPolicy
from fedtransfer.transfer.policies import FrozenHead, Full, HeadOnly, LastK

if TYPE_CHECKING:
    from fedtransfer.recipe import Recipe


@dataclass(frozen=True)
class Stage:
    """One stage: ``rounds`` rounds (``None``: until the run ends; last stage only) under
    ``policy``, with the recipe's objective, local training and codecs unless given here."""

    rounds: int | None
    policy: TransferPolicy
    objective: Objective | None = None
    local: LocalTraining | None = None
    downlink: Codec | None = None
    uplink: Codec | None = None

    def __post_init__(self) -> None:
        if self.rounds is not None and (
            isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1
        ):
            raise ConfigError(f"Stage.rounds: must be an integer >= 1 or None, got {self.rounds!r}")


@dataclass(frozen=True)
class Stages:
    """A staged schedule of policies (LP→FT, FedNCM→FT, progressive unfreezing …).

    >>> from torch import nn
    >>> from fedtransfer.transfer.policies import Full, HeadOnly
    >>> lp_ft = Stages((Stage(2, HeadOnly()), Stage(None, Full())))
    >>> [lp_ft.index_at(r) for r in (1, 2, 3, 50)]
    [0, 0, 1, 1]
    >>> lp_ft.plan(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))).shared
    ('1.weight', '1.bias')
    """

    stages: tuple[Stage, ...] = field(default_factory=lambda: (Stage(None, Full()),))

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("Stages: at least one stage is needed, e.g. (Stage(None, Full()),)")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise ConfigError(f"Stages.stages[{i}]: expected a Stage, got {stage!r}")
            if isinstance(stage.policy, Stages):
                raise ConfigError(f"Stages.stages[{i}]: stages cannot be nested")
            if stage.rounds is None and i != len(self.stages) - 1:
                raise ConfigError(
                    f"Stages.stages[{i}]: only the last stage may run until the end "
                    "(rounds: null); give this stage a number of rounds"
                )

    def prepare(self, model: nn.Module) -> nn.Module:
        for stage in self.stages:
            model = stage.policy.prepare(model)
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        """The first stage's plan (what ``Recipe.validate`` and round 0 see)."""
        return self.stages[0].policy.plan(model)

    def plans(self, model: nn.Module) -> list[ParamPlan]:
        """Every stage's plan for ``model`` (prepared by :meth:`prepare`)."""
        return [s.policy.plan(model) for s in self.stages]

    def index_at(self, round: int) -> int:
        """The stage that round ``round`` (1-based) belongs to."""
        end = 0
        for i, stage in enumerate(self.stages):
            if stage.rounds is None:
                return i
            end += stage.rounds
            if round <= end:
                return i
        return len(self.stages) - 1

    def handover(self, plans: Sequence[ParamPlan], since: int, now: int) -> tuple[str, ...]:
        """Keys a client holding stage ``since``'s starting weights lacks in stage ``now``:
        shared in a stage from ``since`` to ``now - 1`` and not shared now."""
        current = set(plans[now].shared)
        seen: dict[str, None] = {}
        for plan in plans[since:now]:
            seen.update({k: None for k in plan.shared if k not in current})
        return tuple(seen)


@dataclass(frozen=True)
class StagePolicy:
    """The policy of stage ``index`` of ``stages``: every stage's structure, this stage's labels."""

    stages: Stages
    index: int

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.stages.prepare(model)

    def plan(self, model: nn.Module) -> ParamPlan:
        return self.stages.stages[self.index].policy.plan(model)

    def truncate(self, weights: Mapping[str, Tensor], client: str) -> dict[str, Tensor]:
        inner = self.stages.stages[self.index].policy
        return inner.truncate(weights, client) if isinstance(inner, PerClientRank) else {**weights}

    def trim(self, update: Mapping[str, Tensor], client: str) -> dict[str, Tensor]:
        inner = self.stages.stages[self.index].policy
        return inner.trim(update, client) if isinstance(inner, PerClientRank) else {**update}

    def pad(self, update: Mapping[str, Tensor], client: str) -> dict[str, Tensor]:
        inner = self.stages.stages[self.index].policy
        return inner.pad(update, client) if isinstance(inner, PerClientRank) else {**update}


def stage_recipe(recipe: Recipe, round: int) -> tuple[Recipe, int]:
    """The recipe that holds in round ``round`` and its stage index (0 without a schedule)."""
    schedule = recipe.policy
    if not isinstance(schedule, Stages):
        return recipe, 0
    i = schedule.index_at(round)
    stage = schedule.stages[i]
    return (
        replace(
            recipe,
            policy=StagePolicy(schedule, i),
            objective=stage.objective or recipe.objective,
            local=stage.local or recipe.local,
            downlink=stage.downlink or recipe.downlink,
            uplink=stage.uplink or recipe.uplink,
        ),
        i,
    )


def lp_ft(head_rounds: int, *, then: TransferPolicy | None = None, head: str = "head") -> Stages:
    """Linear probing, then fine-tuning (LP-FT, Kumar et al., arXiv 2202.10054): only the head
    for ``head_rounds`` rounds, then ``then`` (default: the whole model; ``Lora(...)`` for LoRA).

    >>> lp_ft(3).stages[1].policy
    Full()
    """
    return Stages((Stage(head_rounds, HeadOnly(head)), Stage(None, then or Full())))


def fedncm(*, then: TransferPolicy | None = None, head: str = "head") -> Stages:
    """FedNCM then fine-tuning (Legate et al., arXiv 2306.03937): one round sets the head to the
    nearest-class-mean classifier of the frozen features, then ``then`` (default: whole model).
    The FedNCM round sends its class sums and counts losslessly (``Float32``), whatever the
    recipe's codecs.
    """
    return Stages(
        (
            Stage(1, HeadOnly(head), objective=NearestClassMean(), uplink=Float32()),
            Stage(None, then or Full()),
        )
    )


def babu_then_head(body_rounds: int, *, head: str = "head") -> Stages:
    """FedBABU as a schedule (Oh et al., arXiv 2106.06042): the body is federated under the
    frozen head for ``body_rounds`` rounds, then the head alone is federated on the learnt
    body (the body reaches clients that missed its last rounds as a hand-over)."""
    return Stages((Stage(body_rounds, FrozenHead(head)), Stage(None, HeadOnly(head))))


def progressive(blocks: int, every: int) -> Stages:
    """Progressive unfreezing (Howard & Ruder, arXiv 1801.06146): the last block (the head)
    first, one more block every ``every`` rounds, until the last ``blocks`` blocks train.

    >>> [s.policy.k for s in progressive(3, every=2).stages]
    [1, 2, 3]
    """
    if blocks < 1 or every < 1:
        raise ConfigError(f"progressive: blocks and every must be >= 1, got {blocks}, {every}")
    return Stages(
        tuple(Stage(every if k < blocks else None, LastK(k)) for k in range(1, blocks + 1))
    )
