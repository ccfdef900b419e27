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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from fedtransfer.client import features
from fedtransfer.client.objectives import ClientOut, Plain
from fedtransfer.client.stacked import (
    Schedule,
    batches,
    client_metrics,
    gradient_orders,
    stack,
    train_stacked,
)
from fedtransfer.client.train import LocalTraining, set_modes
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
    """The cohort cannot be vectorised (the message says why); it runs serially."""


def vectorized_update(
    tasks: Sequence[ClientTask],
    *,
    recipe: Recipe,
    model_fn: Callable[[], nn.Module],
    max_params: int | None = None,
    convolutions: bool = True,
) -> list[Reply] | None:
    """Every task's :class:`Reply`, trained at once; ``None`` when not supported.

    Supported: the :class:`Plain` objective with SGD (momentum, weight decay) or Adam, by
    epochs or steps, any policy (per-client LoRA ranks too) on a model that computes the same
    in train mode on every call (no dropout, no BatchNorm in train mode: a frozen one runs in
    eval mode and is fine), cross-entropy or MSE, any codecs and client transforms. Declined,
    with a debug log saying why: fewer than two tasks, anything else, a model whose frozen
    trunk the feature cache serves (serial is fast there), more than ``max_params`` trainable
    scalars or, with ``convolutions=False``, a convolution that trains (where vectorising
    stops paying: stacked weights stream through memory instead of staying in cache, and
    per-client kernels run as a grouped convolution), or any error while training (serial
    then runs, and reports it as it always does).
    """
    try:
        if len(tasks) < 2:
            raise _Declined("a single task")
        _check_recipe(recipe)
        model, plan = worker_model(recipe.policy, model_fn)
        _check_model(model, plan, max_params, convolutions)
        starts = [start_client(t, recipe, plan) for t in tasks]
        _check_data(tasks)
        _probe(model, plan, next(t.data.x[:2] for t in tasks if len(t.data)))
        group = _group_size(model, plan, tasks, recipe.local)
        trained: list[_Trained] = []
        for i in range(0, len(tasks), group):
            trained += _train(model, plan, tasks[i : i + group], starts[i : i + group], recipe)
        return [
            finish_client(task, recipe, plan, t.weights, s, ClientOut(t.metrics), delta=t.delta)
            for task, s, t in zip(tasks, starts, trained, strict=True)
        ]
    except _Declined as why:
        log.debug("vectorised update of %d clients declined: %s", len(tasks), why)
    except Exception as exc:  # the serial loop runs them again: it does it, or names the client
        log.debug("vectorised update of %d clients failed, running serially: %r", len(tasks), exc)
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


def _check_recipe(recipe: Recipe) -> None:
    if type(recipe.objective) is not Plain:
        raise _Declined(f"objective {recipe.objective!r} is not Plain()")
    if recipe.local.optimizer not in ("sgd", "adam"):
        raise _Declined(f"optimizer {recipe.local.optimizer!r}")


def _trainable(model: nn.Module, plan: ParamPlan) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if k in plan.trainable}


def _check_model(
    model: nn.Module, plan: ParamPlan, max_params: int | None, convolutions: bool
) -> None:
    trainable = _trainable(model, plan)
    if not trainable:
        raise _Declined("nothing trains")
    size = sum(p.numel() for p in trainable.values())
    if max_params is not None and size > max_params:
        raise _Declined(f"{size:,} trainable parameters > max_params={max_params:,}")
    if not convolutions:
        for name, m in model.named_modules():
            if isinstance(m, _ConvNd) and any(
                f"{name}.{k}" in trainable for k, p in m.named_parameters(recurse=False)
            ):
                raise _Declined(f"{name}: a convolution trains (and convolutions=False)")
    if len(list(model.named_parameters(remove_duplicate=False))) != len(
        list(model.named_parameters())
    ):
        raise _Declined("tied parameters")
    if features.head_path(model, plan) is not None and not getattr(features._WORKER, "off", False):
        raise _Declined("only a head trains: the frozen-trunk feature cache serves it")
    set_modes(model, plan)
    try:
        for name, m in model.named_modules():
            if m.training and isinstance(m, _DropoutNd) and m.p > 0:
                raise _Declined(f"{name or 'model'}: dropout draws random numbers in train mode")
            if m.training and isinstance(m, _NormBase):
                raise _Declined(f"{name or 'model'}: {type(m).__name__} in train mode")
    finally:
        model.eval()


def _check_data(tasks: Sequence[ClientTask]) -> None:
    held = [t.data for t in tasks if len(t.data)]
    if not held:
        raise _Declined("no client has data")
    first = held[0]
    for d in held[1:]:
        if (d.x.shape[1:], d.x.dtype, d.y.shape[1:], d.y.dtype) != (
            first.x.shape[1:],
            first.x.dtype,
            first.y.shape[1:],
            first.y.dtype,
        ):
            raise _Declined("clients' examples differ in shape or dtype")


def _probe(model: nn.Module, plan: ParamPlan, x: Tensor) -> None:
    """Decline a model whose train-mode forward is not a pure function of its weights and
    input: it draws from the global generator, changes a buffer, or differs between calls."""
    rng = torch.default_generator.get_state()
    before = {k: b.clone() for k, b in model.named_buffers()}
    set_modes(model, plan)
    try:
        with torch.no_grad():
            first, again = model(x), model(x)
        drew = not torch.equal(torch.default_generator.get_state(), rng)
        moved = [k for k, b in model.named_buffers() if not torch.equal(b, before[k])]
        same = isinstance(first, Tensor) and isinstance(again, Tensor)
        same = same and torch.equal(first, again)
    finally:
        model.eval()
        torch.default_generator.set_state(rng)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(before[k])
    if drew or moved or not same:
        raise _Declined(
            "the model's train-mode forward draws random numbers, updates buffers "
            f"{moved[:3]} or does not return one repeatable tensor"
        )


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
    spec = recipe.local
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
