"""What the vectorised path trains: :func:`supports` returns the reason it declines a recipe
and model (``None``: it trains them), from one table of the
:class:`~fedtransfer.client.train.LocalTraining` options the stacked loop implements
(:data:`OPTIONS`) and explicit checks of the objective and the model — nothing is inferred
from what a function or a model happens to have."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from fedtransfer.client.fast.features import enabled, head_path
from fedtransfer.client.objectives import Plain
from fedtransfer.client.train import LocalTraining, set_modes
from fedtransfer.transfer.plan import ParamPlan

if TYPE_CHECKING:
    from fedtransfer.recipe import Recipe

OPTIONS: Mapping[str, tuple[object, ...] | None] = {
    "optimizer": ("sgd", "adam"),  # StackedSGD, StackedAdam (:mod:`.stacked`)
    "lr": None,  # None: every value LocalTraining accepts
    "momentum": None,
    "weight_decay": None,
    "epochs": None,
    "steps": None,
    "batch_size": None,
    "loss": ("cross_entropy", "mse"),
}
"""Every :class:`LocalTraining` option the stacked loop implements, and the values it
implements (``None``: all). A ``LocalTraining`` field missing here (a new option) or a value
not listed (a new optimiser or loss) is declined, with a log line, until the stacked loop
implements it and it is added here: an option is defined once, in ``LocalTraining``."""


def supports(
    recipe: Recipe,
    model: nn.Module,
    plan: ParamPlan,
    *,
    example: Tensor | None = None,
    max_params: int | None = None,
    convolutions: bool = True,
) -> str | None:
    """Why the vectorised path declines to train ``recipe`` on ``model`` (prepared by the
    recipe's policy, with its ``plan``), naming the objective, option or module; ``None``
    when it trains them, equal to the per-client path within
    :data:`~fedtransfer.client.fast.TOLERANCE`. Checked in this order:

    - the objective is :class:`~fedtransfer.client.Plain` (any other adds a penalty, a
      gradient correction or client memory to the loop);
    - ``recipe.training`` is a ``LocalTraining`` whose every option and value :data:`OPTIONS`
      lists;
    - something trains; at most ``max_params`` trainable scalars and, unless
      ``convolutions``, no convolution that trains (``AutoRuntime``'s rule: past these,
      vectorising stops paying);
    - no tied parameters, no head alone training over a frozen trunk that the feature cache
      serves (exact, and faster client by client), no dropout or BatchNorm in train mode;
    - given an ``example`` input, a train-mode forward that is a pure function of the weights
      and the input (it draws no random numbers, changes no buffer and repeats itself).
    """
    objective = recipe.objective
    if type(objective) is not Plain:
        return (
            f"objective {objective!r}: the vectorised loop trains Plain() only (a penalty, a "
            "gradient correction or client memory changes the loop)"
        )
    reason = _options(recipe.training)
    if reason is None:
        reason = _limits(model, plan, max_params, convolutions)
    if reason is None:
        reason = _model(model, plan)
    if reason is None and example is not None:
        reason = _probe(model, plan, example)
    return reason


def _options(spec: LocalTraining) -> str | None:
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name not in OPTIONS:
            return (
                f"LocalTraining option {f.name}={value!r}: the vectorised loop does not "
                "implement it"
            )
        allowed = OPTIONS[f.name]
        if allowed is not None and value not in allowed:
            return (
                f"LocalTraining option {f.name}={value!r}: the vectorised loop implements "
                f"{f.name} in {list(allowed)}"
            )
    if type(spec) is not LocalTraining:
        return (
            f"local training {type(spec).__name__}: the vectorised loop follows LocalTraining "
            "itself, not a subclass"
        )
    return None


def _trainable(model: nn.Module, plan: ParamPlan) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if k in plan.trainable}


def _limits(
    model: nn.Module, plan: ParamPlan, max_params: int | None, convolutions: bool
) -> str | None:
    trainable = _trainable(model, plan)
    if not trainable:
        return "nothing trains"
    size = sum(p.numel() for p in trainable.values())
    if max_params is not None and size > max_params:
        return (
            f"{size:,} trainable parameters > max_params={max_params:,} (stacked weights "
            "stream through memory: client by client is faster)"
        )
    if not convolutions:
        for name, m in model.named_modules():
            if isinstance(m, _ConvNd) and any(
                f"{name}.{k}" in trainable for k, p in m.named_parameters(recurse=False)
            ):
                return (
                    f"{name}: a convolution trains (and convolutions=False: a grouped "
                    "convolution is slower than client by client)"
                )
    return None


def _model(model: nn.Module, plan: ParamPlan) -> str | None:
    if len(list(model.named_parameters(remove_duplicate=False))) != len(
        list(model.named_parameters())
    ):
        return "tied parameters (stacking each key would untie them)"
    path = head_path(model, plan)
    if path is not None and enabled():
        return (
            f"only the head {path!r} trains: the frozen-trunk feature cache serves it (exact, "
            "and faster client by client)"
        )
    set_modes(model, plan)
    try:
        for name, m in model.named_modules():
            if m.training and isinstance(m, _DropoutNd) and m.p > 0:
                return f"{name or 'model'}: dropout draws random numbers in train mode"
            if m.training and isinstance(m, _NormBase):
                return (
                    f"{name or 'model'}: {type(m).__name__} in train mode (it normalises by, "
                    "and updates its statistics from, each minibatch)"
                )
    finally:
        model.eval()
    return None


def _probe(model: nn.Module, plan: ParamPlan, x: Tensor) -> str | None:
    """Why ``model``'s train-mode forward is not a pure function of its weights and input: it
    draws from the global generator, changes a buffer, or differs between calls."""
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
    if drew:
        return "the model's train-mode forward draws random numbers"
    if moved:
        return f"the model's train-mode forward updates buffers {moved[:3]}"
    if not same:
        return "the model's train-mode forward does not return one repeatable tensor"
    return None
