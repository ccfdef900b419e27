"""Schedules of recipes: which :class:`~fedtransfer.recipe.Recipe` holds in which round.

``Schedule(((5, head_only), (None, full)))`` runs ``head_only`` for rounds 1-5, then ``full``
until the run ends: linear probing then fine-tuning (LP→FT, Kumar et al., arXiv 2202.10054).
Each stage is a whole recipe (its own policy, objective, local training, codecs …); the named
schedules (``lp_ft``, ``fedncm``, ``babu_then_head``, ``progressive``) are factories in
:mod:`fedtransfer.algorithms`. A plain recipe is the one-stage schedule (:func:`as_schedule`).

Every stage's structural edits are made up front (:meth:`Schedule.prepared` wraps the model
factory), so a LoRA stage's adapters exist from round 1, as zero deltas, and every stage's
recipe sees the same model.

When a stage begins the server rebases (:func:`enter_stage`): keys shared so far keep their
aggregated values in the starting weights, the server and objective state restart for the new
shared keys, and the clients' objective memory restarts. A client that holds starting weights
from an earlier stage receives, on its first participation in the new stage, the current values
of every key that was shared since and is not shared now (a *hand-over*, counted as downlink
bytes: :meth:`Schedule.handover`). Keys that leave ``local`` restart from the starting weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

from torch import nn

from fedtransfer import tree
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.recipe import Recipe
from fedtransfer.state import ClientHoldings, ServerState
from fedtransfer.state.clientstore import emptied, mapped
from fedtransfer.transfer.plan import ParamPlan, TransferPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Stages ``(rounds, recipe)`` that hold in turn; ``rounds`` ``None`` (the last stage
    only): until the run ends.

    >>> from fedtransfer.transfer.policies import Full, HeadOnly
    >>> lp_ft = Schedule(((2, Recipe(policy=HeadOnly())), (None, Recipe(policy=Full()))))
    >>> [lp_ft.index_at(r) for r in (1, 2, 3, 50)]
    [0, 0, 1, 1]
    >>> lp_ft.recipe_at(3).policy
    Full()
    """

    stages: tuple[tuple[int | None, Recipe], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(
                "Schedule: at least one stage is needed, e.g. Schedule(((None, Recipe()),))"
            )
        for i, stage in enumerate(self.stages):
            if not (isinstance(stage, tuple) and len(stage) == 2):
                raise ConfigError(
                    f"Schedule.stages[{i}]: expected a pair (rounds, Recipe), got {stage!r}"
                )
            rounds, recipe = stage
            if not isinstance(recipe, Recipe):
                raise ConfigError(
                    f"Schedule.stages[{i}]: expected a Recipe, got {type(recipe).__name__}; "
                    "hint: a stage is a whole recipe, e.g. (5, Recipe(policy=HeadOnly()))"
                )
            if rounds is None:
                if i != len(self.stages) - 1:
                    raise ConfigError(
                        f"Schedule.stages[{i}]: only the last stage may run until the end "
                        "(rounds: None); give this stage a number of rounds"
                    )
            elif isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
                raise ConfigError(
                    f"Schedule.stages[{i}]: rounds must be an integer >= 1 or None, got {rounds!r}"
                )

    @property
    def staged(self) -> bool:
        """More than one stage (a plain recipe is the one-stage schedule)."""
        return len(self.stages) > 1

    def index_at(self, round: int) -> int:
        """The stage that round ``round`` (1-based) belongs to."""
        end = 0
        for i, (rounds, _) in enumerate(self.stages):
            if rounds is None:
                return i
            end += rounds
            if round <= end:
                return i
        return len(self.stages) - 1

    def recipe_at(self, round: int) -> Recipe:
        """The recipe that holds in round ``round``."""
        return self.stages[self.index_at(round)][1]

    def first_round(self, index: int) -> int:
        """The first round of stage ``index``."""
        return 1 + sum(rounds or 0 for rounds, _ in self.stages[:index])

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` with every stage's structural edits (each policy's ``prepare``, in stage
        order); a one-stage schedule leaves it to its recipe."""
        if self.staged:
            for _, recipe in self.stages:
                model = recipe.policy.prepare(model)
        return model

    def prepared(self, model_fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        """The model factory every stage's recipe runs on: ``model_fn`` itself for one stage,
        else one that makes every stage's structural edits."""
        if not self.staged:
            return model_fn
        return Prepared(model_fn, tuple(recipe.policy for _, recipe in self.stages))

    def validate(self, model: nn.Module, *, population: Sequence[str] | None = None) -> ParamPlan:
        """Validate every stage's recipe on the prepared model (errors name the stage);
        return the first stage's plan."""
        if not self.staged:
            return self.stages[0][1].validate(model, population=population)
        prepared = self.prepare(model)
        plans = []
        for i, (_, recipe) in enumerate(self.stages):
            try:
                plans.append(recipe.validate(prepared, population=population))
            except (CompatibilityError, ConfigError) as exc:
                raise type(exc)(f"Schedule.stages[{i}]: {exc}") from None
        return plans[0]

    def start(
        self,
        model: nn.Module,
        *,
        seed: int,
        client_store: str | os.PathLike[str] | None = None,
    ) -> ServerState:
        """The round-0 state of a run of this schedule from ``model`` (its first stage's)."""
        return ServerState.initial(
            self.recipe_at(1), self.prepare(model), seed=seed, client_store=client_store
        )

    def handover(
        self,
        state: ServerState,
        clients: Sequence[str],
        *,
        model_fn: Callable[[], nn.Module],
    ) -> dict[str, tuple[str, ...]]:
        """For each set-up client in ``clients`` that holds an earlier stage's starting
        weights, the keys whose current values it lacks: shared in a stage it missed the end
        of and not shared now (sent to it as a hand-over). ``model_fn``: the prepared
        factory (:meth:`prepared`)."""
        dist = state.distribution
        set_up = set(dist.set_up)
        behind = [c for c in clients if c in set_up and dist.synced.get(c, 0) < dist.stage]
        if not self.staged or not behind:
            return {}
        model = model_fn()
        plans = [recipe.plan(model) for _, recipe in self.stages]
        current = set(plans[dist.stage].shared)
        out: dict[str, tuple[str, ...]] = {}
        for c in behind:
            seen: dict[str, None] = {}
            for plan in plans[dist.synced.get(c, 0) : dist.stage]:
                seen.update({k: None for k in plan.shared if k not in current})
            if seen:
                out[c] = tuple(seen)
        return out

    def synced(self, state: ServerState, clients: Collection[str]) -> dict[str, int]:
        """For each set-up client of a staged schedule, the stage whose starting weights it
        holds once ``clients`` took part in this round (they hold the current stage's)."""
        if not self.staged:
            return {}
        return {**state.distribution.synced, **dict.fromkeys(clients, state.distribution.stage)}


@dataclass(frozen=True)
class Prepared:
    """A model factory with structural edits: ``model_fn()`` prepared by each of
    ``policies`` in turn (equal factories compare equal, so worker caches reuse the model)."""

    model_fn: Callable[[], nn.Module]
    policies: tuple[TransferPolicy, ...]

    def __call__(self) -> nn.Module:
        model = self.model_fn()
        for policy in self.policies:
            model = policy.prepare(model)
        return model


def as_schedule(recipe: Recipe | Schedule) -> Schedule:
    """``recipe`` as a schedule: a plain recipe is the one-stage schedule."""
    if isinstance(recipe, Schedule):
        return recipe
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"expected a Recipe or a Schedule, got {type(recipe).__name__}; hint: build one "
            "with fedtransfer.algorithms (fedavg(), lp_ft(5, fedavg()) …)"
        )
    return Schedule(((None, recipe),))


def begin_round(
    schedule: Schedule, state: ServerState, *, model_fn: Callable[[], nn.Module]
) -> tuple[Recipe, ServerState]:
    """The recipe of round ``state.round + 1`` and the state, rebased for its stage if the
    round begins a new one. ``model_fn``: the schedule's prepared factory."""
    index = schedule.index_at(state.round + 1)
    current = schedule.stages[index][1]
    if index != state.distribution.stage:
        state = enter_stage(current, state, index, model_fn=model_fn)
    return current, state


def enter_stage(
    recipe: Recipe, state: ServerState, index: int, *, model_fn: Callable[[], nn.Module]
) -> ServerState:
    """Rebase ``state`` for stage ``index`` (whose recipe is ``recipe``): the aggregated values
    of the keys shared so far become part of the starting weights, the new shared keys start
    from there, server and objective state restart, clients' memory restarts, and clients
    drop stored local keys that are no longer local."""
    plan = recipe.plan(model_fn())
    start = {**state.distribution.start, **state.params}
    params = tree.clone(tree.select(start, plan.shared))
    server = recipe.pipeline.init(params)
    objective = recipe.objective.server_init(params, plan)
    server.update({f"objective/{k}": v.clone() for k, v in objective.items()})
    log.info("round %d: stage %d begins, %d shared keys", state.round + 1, index, len(params))
    local = set(plan.local)
    dist = state.distribution
    return state.replace(
        params=params,
        server=server,
        distribution=replace(
            dist,
            start=start,
            start_sha256=tree.sha256(start),
            stage=index,
            synced={c: dist.synced.get(c, 0) for c in dist.set_up},
        ),
        holdings=ClientHoldings(
            # clients keep the local keys that stay local; the others restart from the start
            mapped(
                state.holdings.local, lambda held: {k: v for k, v in held.items() if k in local}
            ),
            emptied(state.holdings.memory),
        ),
    )
