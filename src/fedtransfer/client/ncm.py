"""FedNCM: a linear head initialised from class means of frozen features, in one round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedtransfer.client.objectives import ClientContext, ClientOut, _Base
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import CompatibilityError
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Out, Params, State


@dataclass(frozen=True)
class NearestClassMean(_Base):
    """FedNCM (Legate et al., arXiv 2306.03937): each client sends per-class sums and counts
    of the features entering the head (the model is not trained); the server sets the head to
    the nearest-class-mean classifier of the pooled means.

    With class means μ_c of all clients' features, logit_c(x) = s·(μ_c·x − ½‖μ_c‖²), whose
    arg-max is the class with the nearest mean; ``s = 1 / mean_c ‖μ_c‖`` keeps the rows of the
    head near unit norm so fine-tuning starts from moderate logits. Classes no client holds keep
    their head rows. The policy of this stage must share exactly the head (``HeadOnly()``), and
    the server optimiser must pass the step through unchanged (``ServerSGD()``, the default).
    The update a client sends is zero; the sums and counts travel as extras, through the uplink
    codec (which must be lossless), and are counted in the ledger. The sums are added outside the
    aggregator, so a robust aggregator does not protect this round from a client that lies about
    its statistics. ``batch_size`` only bounds memory.

    >>> from torch import nn
    >>> from fedtransfer.transfer.policies import HeadOnly
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> shapes = NearestClassMean().extras_like(
    ...     {k: v for k, v in net.state_dict().items() if k.startswith("2.")}, HeadOnly().plan(net)
    ... )
    >>> {k: tuple(v.shape) for k, v in shapes.items()}
    {'sum': (2, 3), 'count': (2,)}
    """

    batch_size: int = 256
    replaces_step: ClassVar[bool] = True

    def check(self, plan: ParamPlan) -> None:
        _head_keys(plan.shared)

    def train(
        self, model: nn.Module, plan: ParamPlan, data: TensorData, ctx: ClientContext
    ) -> ClientOut:
        weight_key, _ = _head_keys(plan.shared)
        head = model.get_submodule(weight_key.rpartition(".")[0])
        captured: list[Tensor] = []
        hook = head.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
        num_classes, dim = ctx.global_shared[weight_key].shape
        sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.float64)
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(data), self.batch_size):
                    captured.clear()
                    model(data.x[i : i + self.batch_size])
                    y = data.y[i : i + self.batch_size]
                    sums.index_add_(0, y, captured[0].reshape(len(y), -1).double())
                    counts += torch.bincount(y, minlength=num_classes).double()
        finally:
            hook.remove()
        dtype = ctx.global_shared[weight_key].dtype
        return ClientOut(
            metrics={"steps": 0.0},
            extras={"sum": sums.to(dtype), "count": counts.to(dtype)},
        )

    def extras_like(self, params: Params, plan: ParamPlan) -> State:
        weight_key, _ = _head_keys(plan.shared)
        w = params[weight_key]
        return {"sum": torch.zeros_like(w), "count": torch.zeros(w.shape[0], dtype=w.dtype)}

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
        weight_key, bias_key = _head_keys(tuple(params))
        sums = torch.stack([e["sum"].double() for e in extras]).sum(0)
        counts = torch.stack([e["count"].double() for e in extras]).sum(0)
        seen = counts > 0
        if not bool(seen.any()):
            return Out(step, state, {"classes_seen": 0.0})
        means = sums[seen] / counts[seen, None]
        scale = 1.0 / float(means.norm(dim=1).mean().clamp_min(1e-12))
        w, b = params[weight_key], params[bias_key]
        new_w, new_b = w.double().clone(), b.double().clone()
        new_w[seen] = scale * means
        new_b[seen] = -0.5 * scale * (means**2).sum(1)
        out = {**step, weight_key: (new_w - w.double()).to(w.dtype)}
        out[bias_key] = (new_b - b.double()).to(b.dtype)
        return Out(out, state, {"classes_seen": float(seen.sum()), "scale": scale})


def _head_keys(shared: Sequence[str]) -> tuple[str, str]:
    """The (weight, bias) keys of the one linear head ``shared`` must consist of."""
    weights = [k for k in shared if k.endswith(".weight")]
    prefix = weights[0][: -len(".weight")] if len(weights) == 1 else None
    if prefix is None or set(shared) != {f"{prefix}.weight", f"{prefix}.bias"}:
        raise CompatibilityError(
            f"NearestClassMean: the shared keys must be exactly one linear head's weight and "
            f"bias, got {list(shared)[:6]}; hint: use policy HeadOnly() in the FedNCM stage "
            "(and a head with a bias)"
        )
    return f"{prefix}.weight", f"{prefix}.bias"
