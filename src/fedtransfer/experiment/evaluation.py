"""Evaluating an arm after a round: every client's test split under the weights it holds (the
frozen trunk's features cached where only the head trains), the round's bytes and metrics,
and, after the last round, each client's personalised accuracy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.fast.features import evaluate_cached, head_path
from fedtransfer.client.personalization import personalized_accuracy
from fedtransfer.data.federated import FederatedDataset
from fedtransfer.experiment.baselines import IsolatedRound, weights_of
from fedtransfer.experiment.schema import ArmConfig, ExperimentConfig
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.finalize import RoundReport
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.seeding import generator
from fedtransfer.state import ServerState
from fedtransfer.transfer.plan import ParamPlan


def evaluate_arm(
    config: ExperimentConfig,
    arm: ArmConfig,
    schedule: Schedule,
    state: ServerState,
    population: FederatedDataset,
    done: RoundReport | IsolatedRound | None,
) -> dict[str, Any]:
    """The evaluation record of ``arm``'s ``state`` after the round ``done`` (``None``: round
    0; an isolated arm's round sent nothing): global accuracy and loss over every client's
    test split, per-client accuracies, the round's bytes and metrics, and after the last
    round the personalised accuracy."""
    began = time.perf_counter()
    recipe, model = _evaluated(schedule, state, config.model)
    plan = _eval_plan(recipe, model)
    per_client, correct, loss_sum, total = {}, 0.0, 0.0, 0
    trunk: tuple[list[Tensor], str] | None = None  # the last frozen tensors, their hash
    for c in population.clients:
        weights = weights_of(arm.mode, state, c)
        model.load_state_dict(weights, strict=True)
        ev = None
        if plan is not None:  # a frozen trunk: its features of each test set, once
            frozen = [weights[k] for k in plan.frozen]
            if trunk is None or any(a is not b for a, b in zip(frozen, trunk[0], strict=True)):
                trunk = (frozen, tree.sha256({k: weights[k] for k in plan.frozen}))
            ev = evaluate_cached(model, plan, population.test[c], trunk=trunk[1])
        if ev is None:
            ev = evaluate(model, population.test[c])
        per_client[c] = ev["accuracy"]
        n = len(population.test[c])
        correct, loss_sum, total = (
            correct + ev["accuracy"] * n,
            loss_sum + ev["loss"] * n,
            total + n,
        )
    accs = np.array(list(per_client.values()))
    rr = done if isinstance(done, RoundReport) else None
    record: dict[str, Any] = {
        "arm": arm.name,
        "round": state.round,
        "accuracy": round(correct) / total,
        "loss": loss_sum / total,
        "client_accuracy_mean": float(accs.mean()),
        "client_accuracy_p10": float(np.percentile(accs, 10)),
        "bytes_up": rr.bytes_up if rr else 0,
        "bytes_down": rr.bytes_down if rr else 0,
        "round_bytes": (rr.bytes_up + rr.bytes_down) if rr else 0,
        "cum_bytes": state.ledger["up"] + state.ledger["down"],
        "setup_bytes": rr.setup_bytes if rr else 0,
        "cum_setup_bytes": state.ledger["setup"],
        "accepted": len(rr.accepted) if rr else 0,
        "rejected": len(rr.rejected) if rr else 0,
        "rejected_clients": [c for c, _ in rr.rejected] if rr else [],
        "rejected_reasons": {c: why for c, why in rr.rejected} if rr else {},
        "train_loss": (_finite_or_none(done.metrics.get("client/train_loss")) if done else None),
        "round_metrics": (
            {k: v for k, v in done.metrics.items() if math.isfinite(v)} if done else {}
        ),
        "seconds": done.seconds if done else 0.0,
        "eval_seconds": time.perf_counter() - began,
        "client_accuracy": per_client,
    }
    if config.personalization is not None and state.round == config.rounds:
        record.update(_personalized(config, arm, schedule, state, population))
    return record


def _personalized(
    config: ExperimentConfig,
    arm: ArmConfig,
    schedule: Schedule,
    state: ServerState,
    population: FederatedDataset,
) -> dict[str, Any]:
    """Each client fine-tunes its model on its own training split, then is evaluated on its
    own test split: global vs personalised accuracy, weighted, unweighted and p10."""
    spec = config.personalization
    assert spec is not None  # checked by the caller
    recipe, model = _evaluated(schedule, state, config.model)
    accs, sizes = {}, {}
    for c in population.clients:
        weights = recipe.objective.personal(
            weights_of(arm.mode, state, c), state.holdings.memory.get(c, {})
        )
        gen = generator(state.seed, "personalize", c)
        ev = personalized_accuracy(
            model, weights, population.train[c], population.test[c], spec, generator=gen
        )
        accs[c], sizes[c] = ev["accuracy"], len(population.test[c])
    values = np.array(list(accs.values()))
    correct = sum(round(accs[c] * sizes[c]) for c in accs)
    return {
        "personal_accuracy": correct / max(sum(sizes.values()), 1),
        "personal_client_mean": float(values.mean()),
        "personal_client_p10": float(np.percentile(values, 10)),
        "personal_client_accuracy": accs,
    }


def _evaluated(
    schedule: Schedule, state: ServerState, model_fn: Callable[[], nn.Module]
) -> tuple[Recipe, nn.Module]:
    """The recipe that trained ``state`` (round 0: the first round's) and a model of it."""
    recipe = schedule.recipe_at(max(state.round, 1))
    return recipe, recipe.policy.prepare(schedule.prepared(model_fn)())


def _eval_plan(recipe: Recipe, model: nn.Module) -> ParamPlan | None:
    """The plan whose frozen trunk evaluation may take from the feature cache: the recipe's,
    when it trains only the model's final module; else None (evaluate the whole model)."""
    plan = recipe.policy.plan(model)
    return plan if head_path(model, plan) is not None else None


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: a mean over no training steps is recorded as null."""
    return value if value is not None and math.isfinite(value) else None
