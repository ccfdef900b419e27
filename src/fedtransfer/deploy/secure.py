"""Secure aggregation of a deployed round: the server learns only the cohort's weighted mean
update, never one client's (the transport runs the protocol: :mod:`.flower_secure`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.update import ClientResult
from fedtransfer.deploy.federation import Request, open_round
from fedtransfer.errors import ConfigError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.round import Received, RoundReport, apply_updates, conclude
from fedtransfer.server.validate import validate_update
from fedtransfer.state import ServerState
from fedtransfer.transfer.policy import ParamPlan
from fedtransfer.types import Params


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation (SecAgg+, Bell et al. 2020, arXiv 2009.05085) of the clients'
    updates: the server learns only their weighted mean.

    Each client scales its update to the configured norm bound ``c`` (the ``norm_bound``
    aggregator's clipping, moved to the client) and masks it; so every coordinate lies in
    ``[-c, c]``, which is the protocol's clipping range, and is quantised to
    ``quantization_range`` levels (a step of ``2c / quantization_range``). Sums are taken modulo
    ``modulus_range``, which must exceed the cohort size times ``quantization_range``.
    ``num_shares`` / ``reconstruction_threshold``: secret shares per client and how many
    recover a secret, as fractions of the cohort."""

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    def __post_init__(self) -> None:
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(
                    f"SecureAggregation.{name}: a fraction of the cohort in (0, 1], got {value!r}"
                )
        m, q = self.modulus_range, self.quantization_range
        if q < 2 or m <= q or m & (m - 1):
            raise ConfigError(
                f"SecureAggregation: modulus_range ({m}) must be a power of 2 above "
                f"quantization_range ({q}), which must be at least 2"
            )

    def clipping_range(
        self, recipe: Recipe, cohort: int, *, params: Params, plan: ParamPlan
    ) -> float:
        """The clipping range derived from the recipe's update-norm bound; every setting is
        checked here, before round 1."""
        from fedtransfer.transfer.policy import per_client_rank

        pipeline = recipe.pipeline
        c = norm_bound(recipe)
        if pipeline.per_client:
            raise ConfigError(
                f"secure aggregation: per-client server transforms {pipeline.per_client!r} "
                "need individual updates, which the server never sees"
            )
        if recipe.objective.extras_like(params, plan) or per_client_rank(recipe.policy):
            raise ConfigError(
                f"secure aggregation: {recipe.objective!r} / {recipe.policy!r} send more than "
                "one update per client (extras or per-client ranks)"
            )
        counters = [k for k in plan.shared if not params[k].dtype.is_floating_point]
        if counters:
            raise ConfigError(
                f"secure aggregation: shared keys {counters[:3]} are integers (counters), which "
                "the norm bound does not cover; hint: keep them local, e.g. policy "
                "{kind: local_batchnorm} for BatchNorm statistics"
            )
        if cohort < 3:
            raise ConfigError(f"secure aggregation: needs at least 3 clients a round, got {cohort}")
        if cohort * self.quantization_range >= self.modulus_range:
            raise ConfigError(
                f"secure aggregation: {cohort} clients × quantization_range "
                f"{self.quantization_range} must stay below modulus_range {self.modulus_range}"
            )
        return c


def norm_bound(recipe: Recipe) -> float:
    """The recipe's update-norm bound ``c`` (its ``norm_bound`` aggregator), which each client
    applies itself under secure aggregation."""
    from fedtransfer.server.clipping import NormBound

    aggregator = recipe.pipeline.aggregator
    if not isinstance(aggregator, NormBound):
        raise ConfigError(
            f"secure aggregation: the aggregator is {aggregator!r}; expected norm_bound (the "
            "update-norm bound sets the clipping range); hint: --set "
            "'aggregator={kind: norm_bound, c: 1.0}'"
        )
    return float(aggregator.c)


def bounded(update: Params, c: float) -> dict[str, Tensor]:
    """``update`` scaled to L2 norm at most ``c`` (as the ``norm_bound`` aggregator scales each
    update), in float64."""
    norm = tree.global_norm(update)
    scale = 1.0 if norm <= c else c / norm
    return {k: v.double() * scale for k, v in update.items()}


def secure_round(
    recipe: Recipe,
    state: ServerState,
    clients: Sequence[str],
    send: Callable[[Sequence[Request]], tuple[Params, float, int]],
    *,
    model_fn: Callable[[], nn.Module],
) -> tuple[ServerState, RoundReport]:
    """Round ``state.round + 1`` with secure aggregation: ``send`` returns the weighted mean of
    the cohort's bounded updates, their total weight, and the bytes the clients sent; the
    server applies that mean as the round's one update (what the ``norm_bound`` aggregator
    would have computed from the individual updates, up to quantisation)."""
    began = time.perf_counter()
    recipe, state, out, requests = open_round(recipe, state, clients, model_fn=model_fn)
    cohort, r = [q.client for q in requests], state.round + 1
    mean, weight, bytes_up = send(requests)
    update = {k: _like(mean[k], state.params[k]) for k in state.params} if mean else {}
    summed = ClientResult("secure-sum", b"", int(weight))
    kept: Received = []
    rejected: list[tuple[str, str]] = []
    try:
        validate_update(update, weight, reference=state.params, client="secure-sum", round=r)
        kept = [(summed, update, {})]
    except UpdateRejected as exc:
        rejected = [("secure-sum", str(exc))]
    applied = apply_updates(recipe, state, len(clients), kept)
    sent = out.dispatched(recipe, state, cohort, [])
    state, report = conclude(state, sent, [], kept, rejected, applied, cohort=cohort, began=began)
    state = state.replace(ledger={**state.ledger, "up": state.ledger["up"] + bytes_up})
    return state, replace(report, bytes_up=bytes_up)


def _like(value: Tensor, reference: Tensor) -> Tensor:
    if reference.dtype.is_floating_point:
        return value.to(reference.dtype).reshape(reference.shape)
    return value.round().to(reference.dtype).reshape(reference.shape)
