"""The experiment schema: dataclasses whose defaults *are* the default offline experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedtransfer.client.objectives import Objective, Plain
from fedtransfer.client.personalization import Personalization
from fedtransfer.client.train import LocalTraining
from fedtransfer.codecs import Codec, Float32
from fedtransfer.data.augment import RandomAffine
from fedtransfer.data.bundled import Digits, MNIST5k, Source
from fedtransfer.data.partition import Dirichlet, Partitioner
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.config import dump
from fedtransfer.experiment.factories import AlgorithmSpec, ScheduleSpec
from fedtransfer.experiment.spellings import PIPELINE_KEYS, RECIPE_KEYS, former_spellings, unfolded
from fedtransfer.models import CNN, ModelFactory
from fedtransfer.recipe import Recipe
from fedtransfer.robustness.threat import Threat
from fedtransfer.rounds.buffered import FedBuff
from fedtransfer.rounds.participation import Participation
from fedtransfer.rounds.schedule import Schedule, as_schedule
from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.optimizers import ServerSGD
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.sample import Sampler, Uniform
from fedtransfer.server.validate import UpdateLimits
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import Full, HeadOnly
from fedtransfer.transfer.pretrain import PretrainSpec
from fedtransfer.types import StartStep, UpdateTransform


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
    client_start: tuple[StartStep, ...] | None = None
    client_transforms: tuple[UpdateTransform, ...] | None = None
    per_client: tuple[UpdateTransform, ...] | None = None
    limits: UpdateLimits | None = None
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


ARM_FIELDS = (*RECIPE_KEYS, "algorithm", "fedbuff", "schedule")


def inherit_arm_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Complete each arm's partial settings from the experiment's own, in plain config data.

    ``arms: [{name: a, training: {lr: 0.05}}]`` keeps the experiment's other ``training`` settings
    (momentum, batch size …); a component with a different ``kind:`` replaces it whole.
    """
    arms = data.get("arms")
    unfolded(data, "")
    former_spellings(data, "")
    if not isinstance(arms, list):
        return data
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict):
            continue
        unfolded(arm, f"arms.{i}.")
        former_spellings(arm, f"arms.{i}.")
        for name in ARM_FIELDS:
            mine, base = arm.get(name), data.get(name)
            if base is None:
                base = dump(getattr(ExperimentConfig(), name))
            if not (isinstance(mine, dict) and isinstance(base, dict)):
                continue
            if mine.get("kind", base.get("kind")) == base.get("kind"):
                arm[name] = {**base, **mine}
    return data


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
    ``threat`` adds simulated malicious clients to every federated arm; ``participation``
    makes clients of synchronous rounds drop out or straggle past a deadline;
    ``personalization`` fine-tunes each client's model after the last round and reports
    personalised accuracy.
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
    client_start: tuple[StartStep, ...] = ()
    client_transforms: tuple[UpdateTransform, ...] = ()
    per_client: tuple[UpdateTransform, ...] = ()
    limits: UpdateLimits = field(default_factory=UpdateLimits)
    algorithm: AlgorithmSpec | None = None
    fedbuff: FedBuff | None = None
    schedule: ScheduleSpec | None = None
    threat: Threat | None = None
    participation: Participation | None = None
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
        mine = {k: _pick(getattr(arm, k), getattr(self, k)) for k in RECIPE_KEYS}
        recipe = Recipe(
            **{k: v for k, v in mine.items() if k not in PIPELINE_KEYS},
            pipeline=ServerPipeline(**{k: mine[k] for k in PIPELINE_KEYS}),
        )
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
