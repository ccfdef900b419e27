"""Secure aggregation of a deployed round: the server learns only the cohort's weighted mean
update, never one client's (the transport runs the protocol: :mod:`.flower_secure`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from fedtransfer import tree
from fedtransfer.codecs import Codec
from fedtransfer.errors import ConfigError
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Reply, Request, Send
from fedtransfer.transfer.plan import ParamPlan
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
        c = norm_bound(recipe)  # the per-client steps (a rank pad …) are refused there
        if recipe.objective.extras_like(params, plan):
            raise ConfigError(
                f"secure aggregation: {recipe.objective!r} sends more than one update per "
                "client (objective extras)"
            )
        counters = [k for k in plan.shared if not params[k].dtype.is_floating_point]
        if counters:
            raise ConfigError(
                f"secure aggregation: shared keys {counters[:3]} are integers (counters), which "
                "the norm bound does not cover; hint: keep them local, e.g. policy "
                "{kind: local_batchnorm} for BatchNorm statistics"
            )
        if recipe.uplink.error_bound != 0:
            raise ConfigError(
                f"secure aggregation: the uplink {recipe.uplink!r} is lossy, but under secure "
                "aggregation what travels is the protocol's own quantisation of each update, "
                "so a lossy uplink would only distort the sum; hint: --set 'uplink={kind: "
                "float32}'"
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
    """The recipe's update-norm bound ``c``, which each client applies itself under secure
    aggregation: a ``ClipNorm(c)`` per-client step before a linear aggregator, or the
    ``norm_bound`` aggregator (the same thing as one aggregator)."""
    from fedtransfer.server.clipping import ClipNorm, NormBound

    pipeline = recipe.pipeline
    aggregator = pipeline.aggregator
    if isinstance(aggregator, NormBound) and not pipeline.per_client:
        return float(aggregator.c)
    clip = pipeline.per_client
    if len(clip) == 1 and isinstance(clip[0], ClipNorm) and aggregator.linear:
        return float(clip[0].c)
    if pipeline.per_client:
        raise ConfigError(
            f"secure aggregation: per-client server steps {pipeline.per_client!r} need "
            "individual updates, which the server never sees; only one ClipNorm (which the "
            "clients apply themselves) before a linear aggregator can be secured"
        )
    raise ConfigError(
        f"secure aggregation: the aggregator is {aggregator!r}; expected norm_bound (the "
        "update-norm bound sets the clipping range); hint: --set "
        "'aggregator={kind: norm_bound, c: 1.0}'"
    )


def bounded(update: Params, c: float) -> dict[str, Tensor]:
    """``update`` scaled to L2 norm at most ``c`` (as the ``norm_bound`` aggregator scales each
    update), in float64."""
    norm = tree.global_norm(update)
    scale = 1.0 if norm <= c else c / norm
    return {k: v.double() * scale for k, v in update.items()}


SECURE_SUM = "secure-sum"
"""The one reply of a securely aggregated round: the cohort's weighted mean update."""


def secure_sum(
    protocol: Callable[[Sequence[Request]], tuple[Params, float, int]],
    *,
    uplink: Codec,
    params: Params,
) -> Send:
    """The :data:`~fedtransfer.rounds.messages.Send` of a securely aggregated round:
    ``protocol`` delivers the requests and returns the weighted mean of the cohort's bounded
    updates, their total weight and the bytes the clients sent; the round receives that mean
    as one reply, :data:`SECURE_SUM`, weighted by the total (what the ``norm_bound``
    aggregator would have computed from the individual updates, up to quantisation).
    ``params`` are the round's global shared parameters, whose dtypes and shapes the mean
    takes before it is encoded with the (lossless) ``uplink``."""

    def send(requests: Sequence[Request]) -> dict[str, Reply]:
        mean, weight, bytes_up = protocol(requests)
        cohort = tuple(q.client for q in requests)
        if not mean:
            why = "the secure aggregation returned no sum"
            return {
                SECURE_SUM: Reply(SECURE_SUM, b"", 0, error=why, wire_bytes=bytes_up, covers=cohort)
            }
        update = {k: _like(mean[k], params[k]) for k in params}
        payload = uplink.encode(update).to_bytes()
        summed = Reply(SECURE_SUM, payload, int(weight), wire_bytes=bytes_up, covers=cohort)
        return {SECURE_SUM: summed}

    return send


def _like(value: Tensor, reference: Tensor) -> Tensor:
    if reference.dtype.is_floating_point:
        return value.to(reference.dtype).reshape(reference.shape)
    return value.round().to(reference.dtype).reshape(reference.shape)
