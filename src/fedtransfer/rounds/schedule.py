"""Staged rounds: which stage a round is in, the server's rebase when a stage begins, and the
hand-overs to clients that hold an earlier stage's starting weights (see
:mod:`fedtransfer.transfer.schedule`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from fedtransfer import tree
from fedtransfer.recipe import Recipe
from fedtransfer.state import ClientHoldings, ServerState
from fedtransfer.state.clientstore import emptied, mapped
from fedtransfer.transfer.schedule import StagePolicy, stage_recipe

log = logging.getLogger(__name__)


def begin_round(
    recipe: Recipe, state: ServerState, *, model_fn: Callable[[], nn.Module]
) -> tuple[Recipe, ServerState]:
    """The recipe of round ``state.round + 1`` (its stage's, for a staged schedule) and the
    state, rebased for that stage if the round begins a new one."""
    current, index = stage_recipe(recipe, state.round + 1)
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


def handover_keys(
    recipe: Recipe,
    state: ServerState,
    clients: Sequence[str],
    new_clients: Sequence[str],
    *,
    model_fn: Callable[[], nn.Module],
) -> dict[str, tuple[str, ...]]:
    """Staged schedules: for each set-up client still holding an earlier stage's starting
    weights, the keys whose current values it lacks (sent to it as a hand-over)."""
    policy = recipe.policy
    behind = [
        c
        for c in clients
        if c not in new_clients and state.distribution.synced.get(c, 0) < state.distribution.stage
    ]
    if not behind or not isinstance(policy, StagePolicy):
        return {}
    plans = policy.stages.plans(policy.prepare(model_fn()))
    out: dict[str, tuple[str, ...]] = {}
    for c in behind:
        keys = policy.stages.handover(
            plans, state.distribution.synced.get(c, 0), state.distribution.stage
        )
        if keys:
            out[c] = keys
    return out
