"""Schedules as configuration: ``schedule: {kind: lp_ft, head_rounds: 10}`` names a schedule
factory of :mod:`fedtransfer.algorithms` with its settings, and ``schedule: {kind: stages,
stages: [{rounds: 1, policy: {kind: head_only}}, {rounds: null}]}`` spells the stages out, each
changing only the recipe fields it gives. Either is built on the arm's recipe
(:meth:`ScheduleSpec.build`), which every stage starts from."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, runtime_checkable

from fedtransfer import algorithms
from fedtransfer.client.objectives import Objective
from fedtransfer.client.train import LocalTraining
from fedtransfer.codecs import Codec
from fedtransfer.errors import ConfigError
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.transfer.plan import TransferPolicy


@runtime_checkable
class ScheduleSpec(Protocol):
    """A schedule in a configuration: built on the arm's recipe."""

    def build(self, recipe: Recipe) -> Schedule: ...


def overridden(base: Any, changes: Any) -> Any:
    """``base`` (a dataclass) with every field of ``changes`` that ``base`` has too and that
    is set (not ``None``): the one override rule of a configuration (experiment ▸ arm ▸
    stage), so a field added to ``Recipe`` and to an arm or stage is overridable at once."""
    mine = {f.name for f in fields(base)}
    given = {f.name: getattr(changes, f.name) for f in fields(changes) if f.name in mine}
    return replace(base, **{n: v for n, v in given.items() if v is not None})


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``rounds`` rounds (``None``: until the run ends; last stage only) of the
    arm's recipe with the fields given here changed."""

    rounds: int | None = None
    policy: TransferPolicy | None = None
    objective: Objective | None = None
    local: LocalTraining | None = None
    downlink: Codec | None = None
    uplink: Codec | None = None


@dataclass(frozen=True)
class StageList:
    """``kind: stages``: the stages spelled out."""

    stages: tuple[StageSpec, ...] = ()

    def build(self, recipe: Recipe) -> Schedule:
        if not self.stages:
            raise ConfigError(
                "schedule.stages: at least one stage is needed, e.g. "
                "[{rounds: 1, policy: {kind: head_only}}, {rounds: null}]"
            )
        return Schedule(tuple((s.rounds, overridden(recipe, s)) for s in self.stages))


@dataclass(frozen=True)
class LpFt:
    """``kind: lp_ft``: :func:`fedtransfer.algorithms.lp_ft`."""

    head_rounds: int
    then: TransferPolicy | None = None
    head: str = "head"

    def build(self, recipe: Recipe) -> Schedule:
        return algorithms.lp_ft(self.head_rounds, recipe, then=self.then, head=self.head)


@dataclass(frozen=True)
class FedNcm:
    """``kind: fedncm``: :func:`fedtransfer.algorithms.fedncm`."""

    then: TransferPolicy | None = None
    head: str = "head"

    def build(self, recipe: Recipe) -> Schedule:
        return algorithms.fedncm(recipe, then=self.then, head=self.head)


@dataclass(frozen=True)
class BabuThenHead:
    """``kind: babu_then_head``: :func:`fedtransfer.algorithms.babu_then_head`."""

    body_rounds: int
    head: str = "head"

    def build(self, recipe: Recipe) -> Schedule:
        return algorithms.babu_then_head(self.body_rounds, recipe, head=self.head)


@dataclass(frozen=True)
class Progressive:
    """``kind: progressive``: :func:`fedtransfer.algorithms.progressive`."""

    blocks: int
    every: int

    def build(self, recipe: Recipe) -> Schedule:
        return algorithms.progressive(self.blocks, self.every, recipe)
