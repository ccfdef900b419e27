"""Strict config parsing: dotted-path errors, kind tags, overrides, the default file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedtransfer.errors import ConfigError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment import registry
from fedtransfer.experiment.run import load_config
from fedtransfer.experiment.schema import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]


def _parse(data: dict) -> ExperimentConfig:
    return cfgio.parse(ExperimentConfig, data)


def test_config_default_file_is_the_default_object():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert _parse(data) == ExperimentConfig()


def test_config_round_trips_through_yaml():
    cfg = load_config(None, ["arms.1.policy={kind: last_k, k: 2}", "aggregator.weighted=false"])
    assert cfgio.parse(ExperimentConfig, yaml.safe_load(cfgio.to_yaml(cfg))) == cfg


def test_config_unknown_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"^training\.lr_rate: unknown key .*did you mean 'lr'"):
        _parse({"training": {"lr_rate": 0.1}})


def test_config_type_mismatch_names_dotted_path():
    with pytest.raises(ConfigError, match=r"^arms\.1\.training\.lr: expected a number, got str"):
        _parse({"arms": [{"name": "a"}, {"name": "b", "training": {"lr": "fast"}}]})


def test_config_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match=r"^rounds: expected an integer, got bool"):
        _parse({"rounds": True})


def test_config_unknown_kind_lists_choices():
    with pytest.raises(
        ConfigError, match=r"^arms\.0\.policy\.kind: unknown kind 'head_onyl'.*head_only"
    ):
        _parse({"arms": [{"name": "a", "policy": {"kind": "head_onyl"}}]})


def test_config_missing_kind_is_an_error():
    with pytest.raises(ConfigError, match=r"^policy: expected a mapping with a 'kind:' tag"):
        _parse({"policy": {"head": "classifier"}})


def test_config_component_validation_error_names_path():
    with pytest.raises(ConfigError, match=r"^arms\.0\.training: .*lr must be > 0"):
        _parse({"arms": [{"name": "a", "training": {"lr": 0}}]})


def test_config_literal_rejects_other_values():
    with pytest.raises(ConfigError, match=r"^arms\.0\.init: 'random' is not one of"):
        _parse({"arms": [{"name": "a", "init": "random"}]})


def test_config_fixed_tuple_length_checked():
    with pytest.raises(ConfigError, match=r"^model\.channels: expected a list of 2 items, got 3"):
        _parse({"model": {"kind": "cnn", "channels": [1, 2, 3]}})


def test_config_duplicate_arm_names_rejected():
    with pytest.raises(ConfigError, match="repeated"):
        _parse({"arms": [{"name": "a"}, {"name": "a"}]})


def test_config_set_override_by_arm_name_and_index():
    cfg = load_config(None, ["arms.scratch.training={lr: 0.2}", "arms.2.init=scratch", "rounds=7"])
    assert cfg.rounds == 7
    assert cfg.arms[0].training is not None and cfg.arms[0].training.lr == 0.2
    assert cfg.arms[2].init == "scratch"


def test_config_set_override_type_error_names_path():
    with pytest.raises(ConfigError, match=r"^sampler\.clients_per_round: expected an integer"):
        load_config(None, ["sampler.clients_per_round=ten"])


def test_config_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["rounds"])


def test_config_set_unknown_arm_is_an_error():
    with pytest.raises(ConfigError, match="no list item 'nope'"):
        load_config(None, ["arms.nope.init=scratch"])


def test_config_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


REQUIRED = {
    "hf_dataset": {"path": "csv", "data_files": "train.csv", "text": "sentence"},
    "hf_classifier": {"path": "a-saved-model"},
    "timm": {"name": "resnet18"},
    "torchvision": {"name": "resnet18"},
    "lp_ft": {"head_rounds": 5},
    "babu_then_head": {"body_rounds": 3},
    "progressive": {"blocks": 2, "every": 3},
}
"""Kinds without a sensible default for every field: the arguments a config must give."""


@pytest.mark.parametrize(
    ("group", "kind"), [(g, k) for g, table in registry.GROUPS.items() for k in table]
)
def test_registry_every_kind_round_trips(group, kind):
    cls = registry.kinds(group)[kind]
    obj = cls(**REQUIRED.get(kind, {}))
    data = cfgio.dump(obj)
    assert data["kind"] == kind
    assert cfgio.parse(group, data) == obj


def test_recipe_of_arm_applies_overrides():
    cfg = ExperimentConfig()
    head = cfg.recipe(cfg.arms[2])
    assert type(head.policy).__name__ == "HeadOnly"
    assert head.training == cfg.training


def test_config_arm_partial_local_keeps_experiment_settings():
    cfg = load_config(None, ["arms.scratch.training.lr=0.05"])
    local = cfg.recipe(cfg.arms[0]).training
    assert local.lr == 0.05 and local.momentum == cfg.training.momentum == 0.9


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training=null", r"^training: expected a mapping for LocalTraining"),
        ("name=..", r"^name: '\.\.' is not a valid run name"),
        ("pretrain.sha256=abc", r"^pretrain: sha256: only checks a given checkpoint"),
        ("pretrain.holdout_fraction=1.0", r"^pretrain: holdout_fraction: must be in \[0, 1\)"),
        ("data.num_clients=0", r"^data: num_clients: must be >= 1"),
        ("data.partition.alpha=-1", r"^data\.partition: Dirichlet: alpha must be > 0"),
        ("training.lr=.inf", r"^training: LocalTraining: lr must be finite"),
        ("post.0.lr=.inf", r"^post\.0: ServerSGD: lr must be finite"),
        ("name=[oops", r"^--set name: value '\[oops' is not valid YAML"),
    ],
)
def test_config_rejects_bad_values_with_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_arm_algorithm_names_a_recipe_factory_and_keeps_the_rest_of_the_arm() -> None:
    from fedtransfer import algorithms
    from fedtransfer.client.drift import Scaffold
    from fedtransfer.client.objectives import Prox
    from fedtransfer.server import ServerAdam, TrimmedMean

    cfg = load_config(
        None,
        [
            "arms=[{name: prox, algorithm: {kind: fedprox, mu: 0.3}}, "
            "{name: adam, algorithm: {kind: fedadam, lr: 0.02}, aggregator: {kind: trimmed_mean}}, "
            "{name: rep, algorithm: {kind: fedrep, head_epochs: 2}}, {name: plain}]",
            "algorithm={kind: scaffold}",
        ],
    )
    prox, adam, rep, plain = (cfg.recipe(a) for a in cfg.arms)
    assert prox.objective == Prox(mu=0.3) and prox.training == cfg.training
    assert prox.sampler == cfg.sampler and prox.policy == cfg.policy
    assert adam.pipeline.post == (ServerAdam(lr=0.02),)
    assert isinstance(adam.pipeline.aggregator, TrimmedMean)  # the arm's own, kept
    assert rep.policy == algorithms.fedrep().policy and rep.objective.head_epochs == 2  # type: ignore[attr-defined]
    assert plain.objective == Scaffold()  # the experiment's algorithm


def test_every_algorithm_factory_is_configurable_with_its_own_defaults() -> None:
    from fedtransfer.experiment.factories import ALGORITHM_SPECS, ALGORITHMS

    assert len(ALGORITHMS) == 13 and set(ALGORITHM_SPECS) == set(ALGORITHMS)
    base = ExperimentConfig().recipe(ExperimentConfig().arms[0])
    for name, factory in ALGORITHMS.items():
        made, built = factory(), ALGORITHM_SPECS[name]().build(base)
        assert built.objective == made.objective, name
        assert built.pipeline.post == made.pipeline.post, name
        assert built.training == base.training and built.sampler == base.sampler, name


def test_arm_per_client_steps_reach_the_pipeline() -> None:
    from fedtransfer.server import ClipNorm

    cfg = load_config(None, ["per_client=[{kind: clip_norm, c: 2.0}]", "arms=[{name: a}]"])
    assert cfg.recipe(cfg.arms[0]).pipeline.per_client == (ClipNorm(2.0),)


def test_config_reads_the_former_local_key_as_training_with_a_warning() -> None:
    """``local`` names the keys a client keeps; the training settings are ``training``."""
    with pytest.warns(
        DeprecationWarning, match=r"arms\.0\.local: .* now written arms\.0\.training"
    ):
        cfg = load_config(None, ["arms=[{name: a, local: {lr: 0.3}}]"])
    assert cfg.recipe(cfg.arms[0]).training.lr == 0.3
    staged = "{kind: stages, stages: [{rounds: 1, local: {lr: 0.4}}, {}]}"
    with pytest.warns(DeprecationWarning, match=r"schedule\.stages\.0\.local"):
        cfg = load_config(None, [f"schedule={staged}"])
    assert cfg.schedule_of(cfg.arms[0]).recipe_at(1).training.lr == 0.4
    with pytest.warns(DeprecationWarning, match="now written training"):  # an old --set
        cfg = load_config(None, ["local.lr=0.25"])
    assert cfg.training.lr == 0.25 and cfg.training.momentum == ExperimentConfig().training.momentum
    with pytest.raises(ConfigError, match="training is set too"):
        load_config(None, ["arms=[{name: a, local: null, training: {lr: 0.2}}]"])


def test_config_reads_the_former_server_optimizer_as_post_with_a_warning() -> None:
    from fedtransfer.server import ServerAdam

    with pytest.warns(DeprecationWarning, match=r"arms\.0\.server_optimizer: X is now written"):
        cfg = load_config(None, ["arms=[{name: a, server_optimizer: {kind: adam, lr: 0.02}}]"])
    assert cfg.recipe(cfg.arms[0]).pipeline.post == (ServerAdam(lr=0.02),)
    cfg = load_config(None, ["arms=[{name: a, post: [{kind: adam}, {kind: sgd, lr: 0.5}]}]"])
    assert len(cfg.recipe(cfg.arms[0]).pipeline.post) == 2
    with pytest.raises(ConfigError, match="post is set too"):
        load_config(None, ["arms=[{name: a, server_optimizer: {kind: sgd}, post: []}]"])
