"""The experiment schema: dataclasses whose defaults *are* the default offline experiment."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fedtransfer.client.objectives import Objective, Plain
from fedtransfer.client.personalization import Personalization
from fedtransfer.client.train import LocalTraining
from fedtransfer.client.transforms import ClientTransform
from fedtransfer.codecs import Codec, Float32
from fedtransfer.data.augment import RandomAffine
from fedtransfer.data.bundled import Digits, MNIST5k, Source
from fedtransfer.data.partition import Dirichlet, Partitioner
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.config import dump
from fedtransfer.experiment.factories import AlgorithmSpec, ScheduleSpec, overridden
from fedtransfer.models import CNN, ModelFactory
from fedtransfer.recipe import Recipe
from fedtransfer.robustness.threat import Threat
from fedtransfer.rounds.buffered import FedBuff
from fedtransfer.rounds.schedule import Schedule, as_schedule
from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.optimizers import ServerSGD, UpdateTransform
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.sample import Sampler, Uniform
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import Full, HeadOnly
from fedtransfer.transfer.pretrain import PretrainSpec


@dataclass(frozen=True)
class DataConfig:
    """The federated (target) data: a source split over ``num_clients`` by a partitioner."""

    source: Source = field(default_factory=Digits)
    partition: Partitioner = field(default_factory=lambda: Dirichlet(alpha=0.3))
    num_clients: int = 20
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"num_clients: must be >= 1, got {self.num_clients}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class PretrainConfig:
    """Where pre-trained weights come from: train on ``source`` here, or load ``checkpoint``."""

    source: Source = field(default_factory=MNIST5k)
    checkpoint: str | None = None
    sha256: str | None = None
    from_model: bool = False
    """The model factory's own weights are the pre-trained start (a published model such as
    ``minilm``): nothing is trained here, and scratch arms use the factory's ``scratch(seed)``."""
    training: LocalTraining = field(
        default_factory=lambda: LocalTraining(optimizer="adam", lr=1e-3, epochs=10, batch_size=64)
    )
    augment: RandomAffine | None = field(default_factory=RandomAffine)
    holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(
                f"holdout_fraction: must be in [0, 1) so that some source data trains, "
                f"got {self.holdout_fraction}"
            )
        if self.from_model and self.checkpoint is not None:
            raise ConfigError(
                "from_model: the model's own weights are the start, so checkpoint must be null "
                f"(got {self.checkpoint!r}); drop one of the two"
            )
        if self.sha256 is not None and self.checkpoint is None:
            raise ConfigError(
                "sha256: only checks a given checkpoint; set pretrain.checkpoint too, or drop "
                "sha256 to pre-train here (the run records the new checkpoint's hash)"
            )

    def spec(self) -> PretrainSpec:
        return PretrainSpec(self.training, self.augment, self.holdout_fraction)


Mode = Literal["federated", "local-only", "centralised"]


@dataclass(frozen=True)
class ArmConfig:
    """One arm: a name, where it starts, how it trains, and what it changes from the
    experiment's recipe.

    ``mode`` is ``federated`` (the recipe, synchronous or FedBuff), ``local-only`` (every client
    trains alone on its own data, nothing is exchanged) or ``centralised`` (one model on all
    clients' pooled training data: the oracle no federation can beat without more data). The
    last two train ``local`` for ``rounds`` rounds and are evaluated like any arm.
    """

    name: str
    init: Literal["scratch", "pretrained"] = "pretrained"
    mode: Mode = "federated"
    policy: TransferPolicy | None = None
    training: LocalTraining | None = None
    objective: Objective | None = None
    sampler: Sampler | None = None
    aggregator: Aggregator | None = None
    post: tuple[UpdateTransform, ...] | None = None
    downlink: Codec | None = None
    uplink: Codec | None = None
    client_transforms: tuple[ClientTransform, ...] | None = None
    per_client: tuple[UpdateTransform, ...] | None = None
    algorithm: AlgorithmSpec | None = None
    fedbuff: FedBuff | None = None
    schedule: ScheduleSpec | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("federated", "local-only", "centralised"):
            raise ConfigError(
                f"mode: {self.mode!r} is not one of ['federated', 'local-only', 'centralised']"
            )


def check_run_name(name: str) -> str:
    """A run name is one plain folder name: not empty, no separators, no leading '.'."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(
            f"name: {name!r} is not a valid run name; expected one folder name without '/' "
            "or a leading '.', e.g. 'default' or 'digits-alpha0.1'"
        )
    return name


ARM_FIELDS = (
    "policy",
    "training",
    "objective",
    "sampler",
    "aggregator",
    "post",
    "downlink",
    "uplink",
    "client_transforms",
    "per_client",
    "algorithm",
    "fedbuff",
    "schedule",
)


def inherit_arm_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Complete each arm's partial settings from the experiment's own, in plain config data.

    ``arms: [{name: a, training: {lr: 0.05}}]`` keeps the experiment's other ``training`` settings
    (momentum, batch size …); a component with a different ``kind:`` replaces it whole.
    """
    arms = data.get("arms")
    _former_spellings(data, "")
    if not isinstance(arms, list):
        return data
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict):
            continue
        _former_spellings(arm, f"arms.{i}.")
        for name in ARM_FIELDS:
            mine, base = arm.get(name), data.get(name)
            if base is None:
                base = dump(getattr(ExperimentConfig(), name))
            if not (isinstance(mine, dict) and isinstance(base, dict)):
                continue
            if mine.get("kind", base.get("kind")) == base.get("kind"):
                arm[name] = {**base, **mine}
    return data


def _former_spellings(data: dict[str, Any], where: str) -> None:
    """Configs written before the redesign, read with a warning: ``local:`` (the local training
    settings, now ``training:``: ``local`` names the keys a client keeps), ``server_optimizer:
    X`` (now the pipeline's ``post: [X]``) and a staged policy (now ``schedule:``)."""
    _respelled(
        data,
        where,
        "local",
        "training",
        note=f"the local training settings are now written {where}training (local names the "
        "keys each client keeps)",
        combine=_merged,
    )
    _respelled(
        data,
        where,
        "server_optimizer",
        "post",
        note=f"X is now written {where}post: [X] (the server pipeline's steps after the "
        "aggregator)",
        as_new=lambda old: [old],
    )
    policy = data.get("policy")
    if isinstance(policy, dict) and policy.get("kind") == "stages":
        _respelled(
            data,
            where,
            "policy",
            "schedule",
            note=f"{{kind: stages, ...}} is now written {where}schedule: {{kind: stages, ...}} "
            "(a stage changes the whole recipe, not just the policy)",
            hint=f"move the stages to {where}schedule and drop {where}policy",
        )
    schedule = data.get("schedule")
    if isinstance(schedule, dict) and isinstance(schedule.get("stages"), list):
        for j, stage in enumerate(schedule["stages"]):
            if isinstance(stage, dict):
                _former_spellings(stage, f"{where}schedule.stages.{j}.")


def _respelled(
    data: dict[str, Any],
    where: str,
    old: str,
    new: str,
    *,
    note: str,
    as_new: Callable[[Any], Any] = lambda old: old,
    combine: Callable[[Any, Any], Any] | None = None,
    hint: str | None = None,
) -> None:
    """Read the former key ``old`` of ``data`` as ``new`` (its value ``as_new(value)``), with
    a ``DeprecationWarning`` saying ``note``. Where ``new`` is set too, ``combine(old value,
    new value)`` joins them, or a :class:`ConfigError` says they cannot be (``combine``
    absent or returning None)."""
    if old not in data:
        return
    value = as_new(data[old])
    if new in data:
        value = combine(data[old], data[new]) if combine is not None else None
        if value is None:
            raise ConfigError(
                f"{where}{old}: {note}, and {where}{new} is set too; "
                f"hint: {hint or f'drop {where}{old}'}"
            )
    warnings.warn(f"{where}{old}: {note}", DeprecationWarning, stacklevel=4)
    del data[old]
    data[new] = value


def _merged(old: Any, new: Any) -> Any:
    """A former mapping on top of the one now written (``--set local.lr=…`` on a new config),
    or None if either is not a mapping."""
    return {**new, **old} if isinstance(old, dict) and isinstance(new, dict) else None


def _default_arms() -> tuple[ArmConfig, ...]:
    return (
        ArmConfig(name="scratch", init="scratch", policy=Full()),
        ArmConfig(name="pretrained-full", init="pretrained", policy=Full()),
        ArmConfig(name="pretrained-head", init="pretrained", policy=HeadOnly()),
    )


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment; ``ExperimentConfig()`` is the default offline demo.

    Pre-train the CNN on MNIST 5k, federate on sklearn digits over 20 clients (Dirichlet
    α = 0.3, 10 per round) and compare arms scratch / pretrained-full / pretrained-head.
    ``fedbuff`` makes federated arms asynchronous (one round = one server version);
    ``threat`` adds simulated malicious clients to every federated arm; ``personalization``
    fine-tunes each client's model after the last round and reports personalised accuracy.
    """

    name: str = "default"
    seed: int = 0
    rounds: int = 30
    target_accuracy: float = 0.9
    model: ModelFactory = field(default_factory=CNN)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    policy: TransferPolicy = field(default_factory=Full)
    training: LocalTraining = field(
        default_factory=lambda: LocalTraining(lr=0.01, momentum=0.9, epochs=1, batch_size=32)
    )
    objective: Objective = field(default_factory=Plain)
    sampler: Sampler = field(default_factory=lambda: Uniform(clients_per_round=10))
    aggregator: Aggregator = field(default_factory=Mean)
    post: tuple[UpdateTransform, ...] = field(default_factory=lambda: (ServerSGD(),))
    downlink: Codec = field(default_factory=Float32)
    uplink: Codec = field(default_factory=Float32)
    client_transforms: tuple[ClientTransform, ...] = ()
    per_client: tuple[UpdateTransform, ...] = ()
    algorithm: AlgorithmSpec | None = None
    fedbuff: FedBuff | None = None
    schedule: ScheduleSpec | None = None
    threat: Threat | None = None
    personalization: Personalization | None = field(default_factory=Personalization)
    arms: tuple[ArmConfig, ...] = field(default_factory=_default_arms)

    def __post_init__(self) -> None:
        check_run_name(self.name)
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy: must be in (0, 1], got {self.target_accuracy}")
        if not self.arms:
            raise ConfigError(
                "arms: at least one arm is needed, e.g. [{name: scratch, init: scratch}]"
            )
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"arms: names must be unique; repeated {dupes}")
        for i, arm in enumerate(self.arms):
            if not arm.name or "/" in arm.name or arm.name.startswith("."):
                raise ConfigError(
                    f"arms.{i}.name: {arm.name!r} must be non-empty, without '/' or a leading '.'"
                )
            self._check_staged(i, arm)

    def _check_staged(self, i: int, arm: ArmConfig) -> None:
        """A staged schedule needs the synchronous federated loop (the only one with stages)."""
        if not self.schedule_of(arm).staged:
            return
        if arm.mode != "federated":
            raise ConfigError(
                f"arms.{i} ({arm.name}): a staged schedule needs mode: federated, got mode: "
                f"{arm.mode}; hint: set schedule: null for this arm"
            )
        if _pick(arm.fedbuff, self.fedbuff) is not None:
            raise ConfigError(
                f"arms.{i} ({arm.name}): a staged schedule cannot run under fedbuff, because "
                "updates in flight would belong to the previous stage; hint: set fedbuff: "
                "null for this arm"
            )

    def recipe(self, arm: ArmConfig) -> Recipe:
        """The recipe of ``arm``: the experiment's components with the arm's overrides, then
        its named ``algorithm`` (the arm's, else the experiment's) if any, which sets the
        objective and server optimiser; what a schedule's stages start from (see
        :meth:`schedule_of`)."""
        pipeline = ServerPipeline(
            per_client=_pick(arm.per_client, self.per_client),
            aggregator=_pick(arm.aggregator, self.aggregator),
            post=_pick(arm.post, self.post),
        )
        mine = Recipe(
            policy=self.policy,
            training=self.training,
            objective=self.objective,
            downlink=self.downlink,
            uplink=self.uplink,
            client_transforms=self.client_transforms,
            pipeline=pipeline,
            sampler=self.sampler,
        )
        recipe: Recipe = overridden(mine, arm)
        algorithm = _pick(arm.algorithm, self.algorithm)
        return recipe if algorithm is None else algorithm.build(recipe)

    def schedule_of(self, arm: ArmConfig) -> Schedule:
        """What ``arm`` runs: its schedule (the arm's, else the experiment's) built on its
        recipe, or the recipe alone as the one-stage schedule."""
        spec = _pick(arm.schedule, self.schedule)
        recipe = self.recipe(arm)
        return as_schedule(recipe) if spec is None else spec.build(recipe)

    def arm(self, name: str) -> ArmConfig:
        """The arm called ``name``; a :class:`ConfigError` naming the arms if there is none."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(
            f"arm {name!r} is not in the configuration; its arms: {[a.name for a in self.arms]}"
        )

    @property
    def needs_pretrained(self) -> bool:
        return any(a.init == "pretrained" for a in self.arms)


def _pick(mine: Any, base: Any) -> Any:
    """The arm's setting, or the experiment's where the arm sets none."""
    return base if mine is None else mine
