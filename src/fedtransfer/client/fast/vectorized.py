"""Vectorised client updates: a cohort trains at once on stacked parameters (``torch.func``).

:func:`vectorized_update` returns what :func:`~fedtransfer.client.update.client_update` returns
for each task, up to float rounding: the same start (weights, context, memory) and finish
(delta ▸ transforms ▸ encode) code, and in between one training loop for a group of clients
(:mod:`.stacked`). Every trainable parameter gets a leading client dimension; one ``vmap``
of ``functional_call`` computes every client's outputs, one backward pass of the sum of
their losses gives every client's own gradient (the losses are independent: measured as fast
as ``vmap(grad(...))``, and a parameter a forward does not use gets no gradient, as in the
serial loop), and ``torch._foreach`` SGD moves every client. Each client keeps its own
minibatches, drawn from the same generator in the same order as the serial loop; clients
of different sizes get padded, masked minibatches (their loss is the mean over their real
examples), and a client whose steps are done stops moving (parameters and optimiser state):
clients are ordered by their number of steps, so the ones still training are always a
leading slice of the stack.

What it trains is :func:`~.support.supports`'s to say: a cohort it does not (an objective but
``Plain``, a ``LocalTraining`` option it does not implement, a model it cannot stack …) runs
client by client, exactly as on the serial runtime, and the reason is logged as a warning
once per run (a run: the tasks' seed and starting weights) — never silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtransfer.client.fast.stacked import (
    Schedule,
    batches,
    client_metrics,
    gradient_orders,
    stack,
    train_stacked,
)
from fedtransfer.client.fast.support import supports
from fedtransfer.client.objectives import ClientOut
from fedtransfer.client.train import LocalTraining
from fedtransfer.client.update import (
    ClientStart,
    ClientTask,
    finish_client,
    start_client,
    worker_model,
)
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Reply
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Metrics

log = logging.getLogger(__name__)

GROUP_BYTES = 16 << 20
"""Working set of the clients that train together (their stacked parameters, gradients and
optimiser state, and one minibatch each), at most: larger cohorts train in consecutive
groups, which also keeps each group in cache (the runtime's ``chunk`` can only lower it)."""


class _Declined(Exception):
    """The cohort cannot be vectorised (the message says why); it runs client by client."""


class _Once:
    """The (run, reason) pairs already logged: each decline is a warning once per run."""

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self.seen: set[tuple[object, ...]] = set()
        self.lock = threading.Lock()

    def first(self, key: tuple[object, ...]) -> bool:
        with self.lock:
            if key in self.seen:
                return False
            if len(self.seen) >= self.keep:  # a long-lived process of many runs
                self.seen.clear()
            self.seen.add(key)
            return True


_WARNED = _Once()


def _decline(tasks: Sequence[ClientTask], reason: str, *, key: str | None = None) -> None:
    """Log why the cohort runs client by client: a warning the first time in a run (its seed
    and starting weights) for this reason (``key``, default the reason itself), then debug."""
    run = (tasks[0].seed, tasks[0].start_sha256) if tasks else (None, None)
    level = logging.WARNING if _WARNED.first((*run, key or reason)) else logging.DEBUG
    log.log(
        level,
        "vectorised update declined (%s): the cohort of %d clients trains client by client, "
        "as on the serial runtime",
        reason,
        len(tasks),
    )


def vectorized_update(
    tasks: Sequence[ClientTask],
    *,
    recipe: Recipe,
    model_fn: Callable[[], nn.Module],
    max_params: int | None = None,
    convolutions: bool = True,
) -> list[Reply] | None:
    """Every task's :class:`Reply`, trained at once; ``None`` when declined (the caller then
    runs the tasks one by one), with the reason logged (:func:`_decline`).

    Trained: what :func:`~.support.supports` accepts (the :class:`Plain` objective, the
    ``LocalTraining`` options of :data:`~.support.OPTIONS`, any policy — per-client LoRA ranks
    too — on a model that computes the same in train mode on every call, within
    ``max_params`` and ``convolutions``), any codecs and client transforms, on clients whose
    examples share a shape and dtype. Declined: anything else, fewer than two tasks, or any
    error while training (the serial path then runs, and reports it as it always does).
    """
    if len(tasks) < 2:
        _decline(tasks, "fewer than two tasks")
        return None
    try:
        model, plan = worker_model(recipe.policy, model_fn)
        reason = _check_data(tasks)
        if reason is None:
            example = next(t.data.x[:2] for t in tasks if len(t.data))
            reason = supports(
                recipe,
                model,
                plan,
                example=example,
                max_params=max_params,
                convolutions=convolutions,
            )
        if reason is not None:
            _decline(tasks, reason)
            return None
        starts = [start_client(t, recipe, plan) for t in tasks]
        group = _group_size(model, plan, tasks, recipe.training)
        trained: list[_Trained] = []
        for i in range(0, len(tasks), group):
            trained += _train(model, plan, tasks[i : i + group], starts[i : i + group], recipe)
        return [
            finish_client(task, recipe, plan, t.weights, s, ClientOut(t.metrics), delta=t.delta)
            for task, s, t in zip(tasks, starts, trained, strict=True)
        ]
    except _Declined as why:
        _decline(tasks, str(why))
    except Exception as exc:  # the serial loop runs them again: it does it, or names the client
        _decline(tasks, f"training raised {exc!r}", key=f"raised {type(exc).__name__}")
    return None


def _group_size(
    model: nn.Module, plan: ParamPlan, tasks: Sequence[ClientTask], spec: LocalTraining
) -> int:
    """How many clients train together: as many as keep their parameters, gradients,
    optimiser state and minibatches within :data:`GROUP_BYTES` (in cache, on a CPU)."""
    params = sum(p.numel() * p.element_size() for p in _trainable(model, plan).values())
    x = next(t.data.x for t in tasks if len(t.data))
    batch = min(spec.batch_size, max(len(t.data) for t in tasks)) * x[0].nbytes
    return max(2, GROUP_BYTES // (3 * params + batch))


def _trainable(model: nn.Module, plan: ParamPlan) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if k in plan.trainable}


def _check_data(tasks: Sequence[ClientTask]) -> str | None:
    held = [t.data for t in tasks if len(t.data)]
    if not held:
        return "no client has data"
    first = held[0]
    for d in held[1:]:
        if (d.x.shape[1:], d.x.dtype, d.y.shape[1:], d.y.dtype) != (
            first.x.shape[1:],
            first.x.dtype,
            first.y.shape[1:],
            first.y.dtype,
        ):
            return "clients' examples differ in shape or dtype"
    return None


@dataclass(frozen=True, eq=False)
class _Trained:
    """One client's trained weights (every state-dict key), its update if computed for the
    group at once, and its training metrics."""

    weights: dict[str, Tensor]
    delta: dict[str, Tensor] | None
    metrics: Metrics


def _train(
    model: nn.Module,
    plan: ParamPlan,
    tasks: Sequence[ClientTask],
    starts: Sequence[ClientStart],
    recipe: Recipe,
) -> list[_Trained]:
    """Train ``tasks`` together; each one's trained weights, update and metrics."""
    spec = recipe.training
    sched = Schedule.build(
        [batches(len(t.data), spec, s.ctx.generator) for t, s in zip(tasks, starts, strict=True)]
    )
    like = model.state_dict()
    keys = list(_trainable(model, plan))
    weights = [starts[i].weights for i in sched.order]
    for k in plan.labels:  # (load_state_dict would refuse them: serial names the client)
        first = weights[0][k]
        if any(w[k] is not first and w[k].shape != first.shape for w in weights) or (
            first.shape != like[k].shape
        ):
            raise _Declined(f"{k}: a weight's shape is not {tuple(like[k].shape)}")
    orders = gradient_orders(model)
    stacked = {k: stack([w[k] for w in weights], like[k].dtype, orders.get(k)) for k in keys}
    fixed, varying = _split_fixed(weights, [k for k in plan.labels if k not in stacked], like)
    stacked.update(varying)  # not trained, but not the same for every client either
    data = [tasks[i].data for i in sched.order]
    losses = train_stacked(model, plan, spec, sched, stacked, keys, fixed, data)
    deltas = _deltas(plan, stacked, starts)
    rows = {k: v.unbind(0) for k, v in stacked.items()}  # each client's row, in one call per key
    delta_rows = None if deltas is None else {k: d.unbind(0) for k, d in deltas.items()}
    out: list[_Trained] = [_Trained({}, None, {})] * len(tasks)
    for j, i in enumerate(sched.order):
        trained = {k: rows[k][j] if k in rows else fixed[k] for k in plan.labels}
        delta = None if delta_rows is None else {k: d[j] for k, d in delta_rows.items()}
        out[i] = _Trained(trained, delta, client_metrics(sched, j, losses))
    return out


def _deltas(
    plan: ParamPlan, stacked: dict[str, Tensor], starts: Sequence[ClientStart]
) -> dict[str, Tensor] | None:
    """Every client's update (trained minus global shared keys), one subtraction per key for
    the group, as ``tree.sub`` computes it client by client; ``None`` (each client computes
    its own) unless every shared key is stacked and the clients hold the same global keys."""
    first = starts[0].global_shared
    if any(k not in stacked for k in plan.shared) or any(
        s.global_shared[k] is not first[k] for s in starts[1:] for k in plan.shared
    ):
        return None
    return {  # contiguous: each client's row is what it encodes
        k: torch.sub(
            stacked[k],
            first[k].to(stacked[k].dtype),
            out=torch.empty(stacked[k].shape, dtype=stacked[k].dtype),
        )
        for k in plan.shared
    }


def _split_fixed(
    weights: list[dict[str, Tensor]], keys: list[str], like: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Keys every client holds the same value of (passed once, unstacked) and the others."""
    fixed: dict[str, Tensor] = {}
    varying: dict[str, Tensor] = {}
    for k in keys:
        first = weights[0][k]
        if all(w[k] is first or torch.equal(w[k], first) for w in weights[1:]):
            fixed[k] = first.to(like[k].dtype)
        else:
            varying[k] = stack([w[k] for w in weights], like[k].dtype)
    return fixed, varying
