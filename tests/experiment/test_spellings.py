"""An arm is its recipe's own shape: the Recipe's fields at the top of the experiment or arm,
or the same fields under ``recipe:`` (the pipeline's under ``pipeline:`` or directly); the
schema covers every Recipe field, so a field added to ``Recipe`` is configurable."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from fedtransfer import LocalTraining
from fedtransfer.algorithms import hetlora
from fedtransfer.client import ErrorFeedback, Prox
from fedtransfer.codecs import Float16, Int8
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.run import load_config
from fedtransfer.experiment.schema import ArmConfig, ExperimentConfig
from fedtransfer.experiment.spellings import PIPELINE_KEYS, RECIPE_KEYS
from fedtransfer.recipe import Recipe
from fedtransfer.server import ClipNorm, Median, ServerSGD, Uniform
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.validate import UpdateLimits
from fedtransfer.transfer import HeadOnly
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.ranks import RankNarrow


def test_every_recipe_and_pipeline_field_is_a_setting_of_the_experiment_and_of_an_arm() -> None:
    recipe = {f.name for f in dataclasses.fields(Recipe)} - {"pipeline"}
    pipeline = {f.name for f in dataclasses.fields(ServerPipeline)}
    assert set(RECIPE_KEYS) == recipe | pipeline and set(PIPELINE_KEYS) == pipeline
    for cls in (ExperimentConfig, ArmConfig):
        hints = typing.get_type_hints(cls)
        for name in RECIPE_KEYS:
            assert name in hints, f"{cls.__name__} lacks the Recipe setting {name!r}"


def test_every_recipe_field_reaches_the_recipe_of_an_arm() -> None:
    """Each setting given on an arm is its recipe's (none dropped on the way); a field added
    to ``Recipe`` fails here until it has a value below."""
    values = {
        "policy": HeadOnly(),
        "training": LocalTraining(lr=0.123),
        "objective": Prox(mu=0.5),
        "downlink": Float16(),
        "uplink": Int8(),
        "client_start": (RankNarrow(2, (1, 2)),),
        "client_transforms": (ErrorFeedback(),),
        "sampler": Uniform(clients_per_round=3),
        "per_client": (ClipNorm(3.0),),
        "aggregator": Median(),
        "post": (ServerSGD(lr=0.5),),
        "limits": UpdateLimits(max_update_norm=5.0),
    }
    assert set(values) == set(RECIPE_KEYS)
    recipe = ExperimentConfig().recipe(ArmConfig(name="a", **values))  # type: ignore[arg-type]
    for name, value in values.items():
        where = recipe.pipeline if name in PIPELINE_KEYS else recipe
        assert getattr(where, name) == value, name


def test_a_recipe_block_is_read_as_the_same_keys_at_the_top_of_an_arm() -> None:
    nested = load_config(
        None,
        [
            "arms=[{name: a, recipe: {training: {lr: 0.3}, pipeline: {aggregator: {kind: median},"
            " per_client: [{kind: clip_norm, c: 2.0}]}}}]"
        ],
    )
    flat = load_config(
        None,
        [
            "arms=[{name: a, training: {lr: 0.3}, aggregator: {kind: median},"
            " per_client: [{kind: clip_norm, c: 2.0}]}]"
        ],
    )
    a, b = nested.recipe(nested.arms[0]), flat.recipe(flat.arms[0])
    assert a == b
    assert a.training.lr == 0.3 and a.training.momentum == 0.9  # the rest inherited
    assert a.pipeline.aggregator == Median() and a.pipeline.per_client == (ClipNorm(2.0),)


def test_a_recipe_block_at_the_top_sets_the_experiment_settings() -> None:
    cfg = load_config(None, ["recipe={uplink: {kind: float16}, aggregator: {kind: median}}"])
    recipe = cfg.recipe(cfg.arms[0])
    assert type(recipe.uplink).__name__ == "Float16" and recipe.pipeline.aggregator == Median()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "arms=[{name: a, recipe: {rounds: 3}}]",
            r"arms\.0\.recipe: unknown field\(s\) \['rounds'\]",
        ),
        (
            "arms=[{name: a, training: {lr: 0.1}, recipe: {training: {lr: 0.2}}}]",
            r"\['training'\] given both in arms\.0\.recipe and at arms\.0\.",
        ),
        (
            "arms=[{name: a, recipe: {post: [], pipeline: {post: []}}}]",
            r"\['post'\] given both in recipe\.pipeline and in recipe",
        ),
        ("arms=[{name: a, recipe: [1, 2]}]", r"arms\.0\.recipe: expected a mapping"),
    ],
)
def test_a_bad_recipe_block_is_refused_naming_where(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_heterogeneous_ranks_are_configurable_as_their_three_steps() -> None:
    slots = "rank: 4, ranks: [1, 2, 4]"
    cfg = load_config(
        None,
        [
            "policy={kind: lora, rank: 4, train: [head]}",
            f"client_start=[{{kind: rank_narrow, {slots}}}]",
            f"client_transforms=[{{kind: rank_trim, {slots}}}]",
            f"per_client=[{{kind: rank_pad, {slots}}}]",
            "arms=[{name: a}]",
        ],
    )
    expected = hetlora(Recipe(policy=Lora(rank=4, train=("head",))), ranks=(1, 2, 4))
    got = cfg.recipe(cfg.arms[0])
    assert got.client_start == expected.client_start
    assert got.client_transforms == expected.client_transforms
    assert got.pipeline.per_client == expected.pipeline.per_client
