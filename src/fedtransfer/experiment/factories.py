"""The named factories of :mod:`fedtransfer.algorithms` as configuration, built on the arm's
recipe (the experiment's components with the arm's overrides).

``algorithm: {kind: fedprox, mu: 0.1}`` names a recipe factory with its settings: it sets the
objective and the server optimiser (and, for FedRep, FedBABU and LG-FedAvg, the policy) and
keeps everything else of the arm's recipe. The specs are made from the factories' own
signatures, so a factory added to ``ALGORITHMS`` is configurable at once.

``schedule: {kind: lp_ft, head_rounds: 10}`` names a schedule factory, and ``schedule: {kind:
stages, stages: [{rounds: 1, policy: {kind: head_only}}, {rounds: null}]}`` spells the stages
out, each changing only the recipe fields it gives (:func:`overridden`, the one override rule).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
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


@runtime_checkable
class AlgorithmSpec(Protocol):
    """A named algorithm in a configuration: applied to the arm's recipe."""

    def build(self, recipe: Recipe) -> Recipe: ...


ALGORITHMS: dict[str, Callable[..., Recipe]] = {
    f.__name__: f
    for f in (
        algorithms.fedavg,
        algorithms.fedavgm,
        algorithms.fedadam,
        algorithms.fedyogi,
        algorithms.fedadagrad,
        algorithms.fedprox,
        algorithms.scaffold,
        algorithms.feddyn,
        algorithms.fednova,
        algorithms.ditto,
        algorithms.fedrep,
        algorithms.fedbabu,
        algorithms.lg_fedavg,
    )
}
# the factory arguments the arm's recipe gives (its policy, local training and sampler)
_FROM_RECIPE = ("policy", "training", "clients_per_round")


def _summary(factory: Callable[..., Recipe]) -> str:
    """The first paragraph of ``factory``'s docstring (its examples stay with it)."""
    return (factory.__doc__ or "").split("\n\n")[0].strip()


def _algorithm_spec(name: str, factory: Callable[..., Recipe]) -> type:
    """A frozen dataclass whose fields are ``factory``'s own settings, with its defaults."""
    hints = typing.get_type_hints(factory)
    params = [
        p for p in inspect.signature(factory).parameters.values() if p.name not in _FROM_RECIPE
    ]
    sets_policy = "policy" not in inspect.signature(factory).parameters

    def build(self: Any, recipe: Recipe) -> Recipe:
        made = factory(**{p.name: getattr(self, p.name) for p in params})
        pipeline = replace(recipe.pipeline, post=made.pipeline.post)
        policy = made.policy if sets_policy else recipe.policy
        return replace(recipe, policy=policy, objective=made.objective, pipeline=pipeline)

    cls = dataclasses.make_dataclass(
        "".join(part.capitalize() for part in name.split("_")) + "Algorithm",
        [(p.name, hints[p.name], dataclasses.field(default=p.default)) for p in params],
        namespace={"build": build, "__doc__": f"``kind: {name}``: {_summary(factory)}"},
        frozen=True,
    )
    cls.__module__ = __name__
    globals()[cls.__name__] = cls  # importable by name (pickle, repr)
    return cls


ALGORITHM_SPECS: dict[str, type] = {n: _algorithm_spec(n, f) for n, f in ALGORITHMS.items()}


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
    training: LocalTraining | None = None
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
