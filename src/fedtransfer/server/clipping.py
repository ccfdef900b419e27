"""Clipping: each client's update clipped to a norm (``ClipNorm``, a per-client pipeline
step), norm bounding (``NormBound`` = ``ClipNorm`` then the mean) and centred clipping
(conventions as in :mod:`.robust`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedtransfer import tree
from fedtransfer.server.aggregate import Mean
from fedtransfer.server.robust import (
    _assemble,
    _check_count,
    _check_radius,
    _flat,
    _floating,
    _participants,
    _unflat,
)
from fedtransfer.types import Out, Params, State, UpdateContext


@dataclass(frozen=True)
class CenteredClipping:
    """Centred clipping (Karimireddy et al. 2021, arXiv 2012.10333), ``iters`` times from v:

    ``v ← v + mean_i clip_τ(Δ_i − v)`` with ``clip_τ(z) = z · min(1, τ/‖z‖)`` (global norm), so
    each iteration moves ``v`` by at most ``tau``. ``v`` starts at the previous round's aggregate,
    kept in the state as ``v/<key>`` (zeros from :meth:`init`). The mean is unweighted over the
    clients with positive weight: example counts are the clients' word, untrusted here. The
    ``clipped`` metric counts the clients clipped in the last iteration.

    >>> import torch
    >>> cc = CenteredClipping(tau=1.0)
    >>> ups = [{"w": torch.tensor([0.5, 0.0])}, {"w": torch.tensor([0.0, 10.0])}]
    >>> out = cc.aggregate(ups, [1, 1], cc.init(ups[0]))
    >>> out.value, out.metrics["clipped"]
    ({'w': tensor([0.2500, 0.5000])}, 1.0)
    """

    tau: float = 1.0
    iters: int = 1
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_radius("CenteredClipping", "tau", self.tau)
        _check_count("CenteredClipping", "iters", self.iters, 1)

    def init(self, params: Params) -> State:
        return {f"v/{k}": torch.zeros_like(params[k]) for k in _floating(params)}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        ups, ws = _participants(repr(self), updates, weights)
        keys = _floating(ups[0])
        wrong = [
            k for k in keys if f"v/{k}" not in state or state[f"v/{k}"].shape != ups[0][k].shape
        ]
        if wrong:
            raise ValueError(
                f"{self!r}: state has no 'v/{wrong[0]}' of shape {list(ups[0][wrong[0]].shape)}; "
                "expected the state from init(params) or from the previous round"
            )
        x, v = _flat(ups), _flat([{k: state[f"v/{k}"] for k in keys}])[0]
        for _ in range(self.iters):
            z = x - v
            norms = z.norm(dim=1)
            v = v + (z * torch.clamp(self.tau / norms, max=1.0)[:, None]).mean(dim=0)
        value = _assemble(ups, ws, _unflat(v, ups[0]))
        metrics = {"clients": float(len(ups)), "clipped": float((norms > self.tau).sum())}
        return Out(value, {f"v/{k}": value[k].clone() for k in keys}, metrics)


@dataclass(frozen=True)
class ClipNorm:
    """One client's update scaled to global L2 norm at most ``c``: ``Δ · min(1, c/‖Δ‖)`` over
    its floating tensors, in float64 (integer tensors pass through). A per-client step of the
    :class:`~fedtransfer.server.pipeline.ServerPipeline` (``per_client=(ClipNorm(c),)``), so
    the clip radius is a setting of the pipeline that secure aggregation and differential
    privacy read, not a property of an aggregator; the same transform clips on the client as
    a client transform. The scale is computed and applied in float64, the result rounded back
    to each tensor's dtype (an update within the bound is returned unchanged). The ``clipped``
    metric is 1 for a clipped update.

    >>> import torch
    >>> from fedtransfer.types import UpdateContext
    >>> ClipNorm(c=1.0).apply({"w": torch.tensor([3.0, 4.0])}, {}, UpdateContext({})).value
    {'w': tensor([0.6000, 0.8000])}
    """

    c: float = 1.0

    def __post_init__(self) -> None:
        _check_radius("ClipNorm", "c", self.c)

    def init(self, params: Params) -> State:
        return {}

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        norm = tree.global_norm(update)
        if norm <= self.c:
            return Out(dict(update), state, {"clipped": 0.0})
        scale = self.c / norm
        value = {
            k: (v.detach().double() * scale).to(v.dtype) if v.dtype.is_floating_point else v
            for k, v in update.items()
        }
        return Out(value, state, {"clipped": 1.0})


@dataclass(frozen=True)
class NormBound:
    """Norm bounding (Sun et al. 2019, arXiv 1911.07963): updates scaled to ‖Δ_i‖ ≤ c, then FedAvg.

    Each update is scaled by ``min(1, c/‖Δ_i‖)`` (global L2 norm of its floating tensors:
    :class:`ClipNorm`); the result is their sample-weighted mean (:class:`Mean`), so its norm
    is at most ``c`` too. The same as ``ServerPipeline(per_client=(ClipNorm(c),))``, as one
    aggregator for configurations that name it.

    >>> import torch
    >>> ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.5, 0.0])}]
    >>> NormBound(c=1.0).aggregate(ups, [1, 1], {}).value
    {'w': tensor([0.5500, 0.4000])}
    """

    c: float = 1.0
    linear: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_radius("NormBound", "c", self.c)

    def init(self, params: Params) -> State:
        return {}

    def aggregate(
        self, updates: Sequence[Params], weights: Sequence[float], state: State
    ) -> Out[dict[str, Tensor]]:
        ups, ws = _participants(repr(self), updates, weights)
        keys = _floating(ups[0])
        clip = ClipNorm(self.c)
        clipped = [clip.apply(tree.select(u, keys), {}, UpdateContext({})) for u in ups]
        mean = Mean().aggregate([c.value for c in clipped], ws, {}).value
        metrics = {
            "clients": float(len(ups)),
            "clipped": float(sum(c.metrics["clipped"] for c in clipped)),
        }
        return Out(_assemble(ups, ws, mean), state, metrics)
