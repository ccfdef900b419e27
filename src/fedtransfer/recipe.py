"""``Recipe``: the frozen bundle of everything that defines a federated algorithm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedtransfer.client.drift import Scaffold
from fedtransfer.client.objectives import Objective, Plain
from fedtransfer.client.train import LocalTraining
from fedtransfer.codecs import Codec, Float32, Payload
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.server.aggregate import Aggregator
from fedtransfer.server.optimizers import ServerSGD
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.sample import Sampler, Uniform
from fedtransfer.server.validate import UpdateLimits
from fedtransfer.transfer import ranks
from fedtransfer.transfer.plan import ParamPlan, TransferPolicy
from fedtransfer.transfer.policies import Full
from fedtransfer.types import StartStep, UpdateTransform, needs_of

_GIVEN = {
    # what each place of a transform gives in its context, beyond the global parameters
    "client_transforms": frozenset({"client", "uplink"}),
    "pipeline.per_client": frozenset({"client"}),
    "pipeline.post": frozenset(),
}


@dataclass(frozen=True)
class Recipe:
    """Policy, local training and objective, client transforms, codecs, server pipeline and
    sampler: one federated algorithm.

    ``client_start`` steps act on the weights a client holds before it trains (HetLoRA's
    narrowing), ``client_transforms`` on each client's update before the uplink codec (error
    feedback, clipping, a HetLoRA rank trim): the same :class:`~fedtransfer.types.UpdateTransform`
    protocol as the server pipeline's per-client and post steps. ``downlink`` encodes the
    global model, ``uplink`` the updates. Recipes that hold in turn
    are a :class:`~fedtransfer.rounds.schedule.Schedule`.

    >>> from fedtransfer.models import CNN
    >>> plan = Recipe().validate(CNN()(), population=[str(i) for i in range(10)])
    >>> len(plan.shared) > 0
    True
    """

    policy: TransferPolicy = field(default_factory=Full)
    training: LocalTraining = field(default_factory=LocalTraining)
    objective: Objective = field(default_factory=Plain)
    downlink: Codec = field(default_factory=Float32)
    uplink: Codec = field(default_factory=Float32)
    client_start: tuple[StartStep, ...] = ()
    client_transforms: tuple[UpdateTransform, ...] = ()
    pipeline: ServerPipeline = field(default_factory=ServerPipeline)
    sampler: Sampler = field(default_factory=Uniform)
    limits: UpdateLimits = field(default_factory=UpdateLimits)

    def plan(self, model: nn.Module) -> ParamPlan:
        """The policy's plan for ``model`` after the policy's structural edits."""
        return self.policy.plan(self.policy.prepare(model))

    def validate(self, model: nn.Module, *, population: Sequence[str] | None = None) -> ParamPlan:
        """Fail fast, before round 1, on components that cannot work together; return the plan."""
        self._check_types()
        if getattr(self.downlink, "sparse", False):
            raise CompatibilityError(
                f"Recipe.downlink: {self.downlink!r} drops most entries of each tensor, and the "
                "downlink carries the global model itself, so clients would train a mostly-zero "
                "model; hint: sparsify the uplink (with ErrorFeedback) and use Float16/Int8 on "
                "the downlink"
            )
        prepared = self.policy.prepare(model)
        plan = self.policy.plan(prepared)
        self._check_plan(prepared, plan)
        if population is not None:
            self.sampler.sample(list(population), seed=0, round=1)
        return plan

    def _check_types(self) -> None:
        checks: list[tuple[str, object, type]] = [
            ("policy", self.policy, TransferPolicy),
            ("training", self.training, LocalTraining),
            ("objective", self.objective, Objective),
            ("downlink", self.downlink, Codec),
            ("uplink", self.uplink, Codec),
            ("pipeline.aggregator", self.pipeline.aggregator, Aggregator),
            ("sampler", self.sampler, Sampler),
            ("limits", self.limits, UpdateLimits),
        ]
        groups: tuple[tuple[str, type, tuple[object, ...]], ...] = (
            ("pipeline.post", UpdateTransform, self.pipeline.post),
            ("pipeline.per_client", UpdateTransform, self.pipeline.per_client),
            ("client_transforms", UpdateTransform, self.client_transforms),
            ("client_start", StartStep, self.client_start),
        )
        for group, proto, items in groups:
            checks += [(f"{group}[{i}]", t, proto) for i, t in enumerate(items)]
        for name, value, proto in checks:
            if not isinstance(value, proto):
                raise ConfigError(
                    f"Recipe.{name}: {type(value).__name__} is not a {proto.__name__}; "
                    "hint: build components from fedtransfer's classes or implement the protocol"
                )
        for group, _, items in groups:
            for i, t in enumerate(items):
                missing = needs_of(t) - _GIVEN.get(group, frozenset({"client", "uplink"}))
                if missing:
                    raise ConfigError(
                        f"Recipe.{group}[{i}]: {t!r} needs {sorted(missing)} in its context, "
                        f"which a step there is not given; hint: place it where it is given "
                        "(client_transforms get the client and the uplink codec, "
                        "pipeline.per_client the client)"
                    )

    def _check_plan(self, prepared: nn.Module, plan: ParamPlan) -> None:
        """The plan shares something, fits the objective, and the codecs keep its dtypes."""
        if not plan.shared:
            raise CompatibilityError(
                f"Recipe: policy {self.policy!r} shares no keys, so nothing would be federated; "
                "hint: use a policy that labels at least one key 'shared'"
            )
        self.objective.check(plan)
        if getattr(self.objective, "replaces_step", False):
            self._check_outright()
        ranks.check(self)
        if ranks.slots_of(self) and isinstance(self.objective, Scaffold):
            raise CompatibilityError(
                "Recipe: SCAFFOLD's control variates are full-rank, so with heterogeneous LoRA "
                "ranks they would train adapter slots a client does not hold; hint: use "
                "Plain(), Prox(mu) or Dyn(alpha) with hetlora(...)"
            )
        shared = {
            k: torch.zeros_like(v) for k, v in prepared.state_dict().items() if k in plan.shared
        }
        for name, codec in (("downlink", self.downlink), ("uplink", self.uplink)):
            payload = Payload.from_bytes(codec.encode(shared).to_bytes())
            try:
                back = codec.decode(payload, None)  # dtypes are checked below, named
            except TypeError as exc:
                raise CompatibilityError(
                    f"Recipe.{name}: {type(codec).__name__}.decode(payload, expected) failed "
                    f"({exc}); a codec decodes against what the receiver expects: hint: give "
                    "decode an `expected: Params | None = None` argument (see Codec)"
                ) from None
            wrong = [k for k in shared if k not in back or back[k].dtype != shared[k].dtype]
            if wrong:
                k = wrong[0]
                raise CompatibilityError(
                    f"Recipe.{name}: {type(codec).__name__} does not return shared key {k!r} in "
                    f"the model's dtype {shared[k].dtype} (got "
                    f"{back[k].dtype if k in back else 'nothing'}); hint: use a float32 model "
                    "or a codec for this dtype"
                )

    def _check_outright(self) -> None:
        """An objective that sets parameters from clients' statistics (FedNCM) needs them
        exact, and its step passed through unchanged."""
        name = type(self.objective).__name__
        if self.pipeline.post not in ((), (ServerSGD(),)):
            raise CompatibilityError(
                f"Recipe: {name} sets parameters outright, so the server optimiser must pass "
                f"its step through unchanged; got post={self.pipeline.post!r}; hint: use "
                "ServerSGD() (lr 1, no momentum) here"
            )
        if self.uplink.error_bound != 0:
            raise CompatibilityError(
                f"Recipe: {name} computes parameters from the statistics clients send, which "
                f"the lossy uplink {self.uplink!r} would distort; hint: give this stage a "
                "lossless uplink, e.g. uplink=Float32() in its stage's recipe — "
                "fedncm() does"
            )
