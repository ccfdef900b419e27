"""Drift control on the client: SCAFFOLD, FedDyn and FedNova objectives (see :mod:`.objectives`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.objectives import (
    ClientContext,
    ClientOut,
    _Base,
    _check_nonneg,
    _proximal,
    effective_steps,
    scale_floats,
    trainable_shared,
)
from fedtransfer.client.train import local_train
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Out, Params, State


@dataclass(frozen=True)
class Scaffold(_Base):
    """SCAFFOLD (Karimireddy et al., arXiv 1910.06378), option II control variates.

    Each gradient step uses ``g − c_i + c``; afterwards
    ``c_i⁺ = c_i − c + (θ − w) / (a · lr)`` with ``a`` the effective number of steps
    (:func:`effective_steps`; ``a = K`` for plain SGD as in the paper). The client keeps
    ``c_i`` in its memory and sends ``Δc_i``; the server keeps ``c`` and sets
    ``c ← c + |S|/N · mean(Δc_i)``. The uplink and downlink carry two tensors per parameter,
    and the ledger counts them.

    >>> from torch import nn
    >>> from fedtransfer.transfer import Full
    >>> net = nn.Linear(2, 1)
    >>> sorted(Scaffold().server_init(net.state_dict(), Full().plan(net)))
    ['c/bias', 'c/weight']
    """

    def server_init(self, params: Params, plan: ParamPlan) -> State:
        return {f"c/{k}": torch.zeros_like(params[k]) for k in trainable_shared(plan)}

    def extras_like(self, params: Params, plan: ParamPlan) -> State:
        return {f"dc/{k}": torch.zeros_like(params[k]) for k in trainable_shared(plan)}

    def broadcast(self, state: State) -> State:
        return dict(state)

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        keys = trainable_shared(plan)
        c = {k: ctx.broadcast.get(f"c/{k}", torch.zeros_like(ctx.global_shared[k])) for k in keys}
        ci = {k: ctx.memory.get(f"c/{k}", torch.zeros_like(c[k])) for k in keys}
        shift = {k: c[k] - ci[k] for k in keys}

        def correct(params: dict[str, nn.Parameter]) -> None:
            for k in keys:
                grad = params[k].grad
                if grad is not None:
                    grad.add_(shift[k])

        metrics = local_train(model, plan, data, ctx.spec, generator=ctx.generator, correct=correct)
        a = effective_steps(metrics["steps"], ctx.spec)
        if a == 0:
            return ClientOut(metrics, memory={f"c/{k}": ci[k] for k in keys})
        trained = model.state_dict()
        new = {
            k: ci[k] - c[k] + (ctx.global_shared[k] - trained[k]) / (a * ctx.spec.lr) for k in keys
        }
        return ClientOut(
            metrics,
            memory={f"c/{k}": new[k].detach().clone() for k in keys},
            extras={f"dc/{k}": (new[k] - ci[k]).detach() for k in keys},
        )

    def server_apply(
        self,
        step: dict[str, Tensor],
        *,
        updates: Sequence[Params],
        extras: Sequence[State],
        weights: Sequence[float],
        state: State,
        population_size: int,
        params: Params,
    ) -> Out[dict[str, Tensor]]:
        if not extras:
            return Out(step, state)
        new = dict(state)
        frac = len(extras) / max(population_size, len(extras))
        for name in state:
            key = "dc/" + name.removeprefix("c/")
            parts = [e[key] for e in extras if key in e]
            if parts:
                new[name] = state[name] + frac * torch.stack(parts).mean(dim=0)
        return Out(step, new, {"control_norm": tree.global_norm(new)})


@dataclass(frozen=True)
class Dyn(_Base):
    """FedDyn (Acar et al., arXiv 2111.04263): dynamic regularisation with strength ``alpha``.

    Client objective ``L_i(w) − ⟨g_i, w⟩ + α/2 ||w − θ||²`` with memory ``g_i ← g_i − α(w − θ)``;
    server state ``h ← h − α/N · Σ_i Δ_i`` and step ``mean(Δ) − h/α`` (the aggregator's mean,
    unweighted in the paper). Pair with ``ServerSGD(lr=1)``.

    >>> Dyn(alpha=0.1).alpha
    0.1
    """

    alpha: float = 0.01

    def __post_init__(self) -> None:
        _check_nonneg("Dyn", "alpha", self.alpha)
        if self.alpha == 0:
            raise ConfigError("Dyn: alpha must be > 0 (the server step divides by it), got 0")

    def server_init(self, params: Params, plan: ParamPlan) -> State:
        return {f"h/{k}": torch.zeros_like(params[k]) for k in trainable_shared(plan)}

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        keys = trainable_shared(plan)
        anchor = {k: ctx.global_shared[k].detach() for k in keys}
        g = {k: ctx.memory.get(f"g/{k}", torch.zeros_like(anchor[k])) for k in keys}
        prox = _proximal(anchor, keys, self.alpha)

        def penalty(params: dict[str, nn.Parameter]) -> Tensor:
            total = prox(params)
            for k in keys:
                total = total - (g[k] * params[k]).sum()
            return total

        metrics = local_train(model, plan, data, ctx.spec, generator=ctx.generator, penalty=penalty)
        trained = model.state_dict()
        memory = {
            f"g/{k}": (g[k] - self.alpha * (trained[k] - anchor[k])).detach().clone() for k in keys
        }
        return ClientOut(metrics, memory=memory)

    def server_apply(
        self,
        step: dict[str, Tensor],
        *,
        updates: Sequence[Params],
        extras: Sequence[State],
        weights: Sequence[float],
        state: State,
        population_size: int,
        params: Params,
    ) -> Out[dict[str, Tensor]]:
        if not updates:
            return Out(step, state)
        n = max(population_size, len(updates))
        new, out = dict(state), dict(step)
        for name in state:
            k = name.removeprefix("h/")
            total = torch.stack([u[k].to(state[name].dtype) for u in updates]).sum(dim=0)
            new[name] = state[name] - self.alpha / n * total
            out[k] = step[k] - new[name].to(step[k].dtype) / self.alpha
        return Out(out, new, {"h_norm": tree.global_norm(new)})


@dataclass(frozen=True)
class Nova(_Base):
    """FedNova (Wang et al., arXiv 2007.07481): normalised averaging over unequal local steps.

    Each client sends ``Δ_i / a_i`` (``a_i`` from :func:`effective_steps`) and ``a_i``; the
    server rescales the aggregated normalised update by ``τ_eff = Σ p_i a_i`` with ``p_i`` the
    aggregation weights. With equal steps everywhere this is FedAvg. It assumes the weighted
    ``Mean`` aggregator.

    >>> from fedtransfer.client.train import LocalTraining
    >>> effective_steps(10, LocalTraining(momentum=0.0))
    10.0
    """

    def extras_like(self, params: Params, plan: ParamPlan) -> State:
        return {"a": torch.zeros(1)}

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        metrics = local_train(model, plan, data, ctx.spec, generator=ctx.generator)
        a = effective_steps(metrics["steps"], ctx.spec)
        return ClientOut(
            metrics,
            extras={"a": torch.tensor([a], dtype=torch.float32)},
            update_scale=1.0 / a if a > 0 else 1.0,
        )

    def server_apply(
        self,
        step: dict[str, Tensor],
        *,
        updates: Sequence[Params],
        extras: Sequence[State],
        weights: Sequence[float],
        state: State,
        population_size: int,
        params: Params,
    ) -> Out[dict[str, Tensor]]:
        total = float(sum(weights))
        if not extras or total <= 0:
            return Out(step, state)
        tau_eff = sum(w * float(e["a"][0]) for w, e in zip(weights, extras, strict=True)) / total
        return Out(scale_floats(step, tau_eff), state, {"tau_eff": tau_eff})
