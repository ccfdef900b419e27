"""Contract suite for transfer policies: every plan labels every key once, prepare is idempotent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from fedtransfer import TransferPolicy
from fedtransfer.errors import PlanError
from fedtransfer.models import CNN
from fedtransfer.transfer import Full, HeadOnly, LastK, LocalBatchNorm, PersonalHead, Rules


def _seq_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _seq_plain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": CNN(), "seq_bn": _seq_bn}

POLICIES: list[TransferPolicy] = [
    Full(),
    HeadOnly(),
    LastK(1),
    LastK(2),
    LocalBatchNorm(),
    PersonalHead(),
    Rules(rules=(("type:_BatchNorm", "local"), ("type:Linear", "shared")), default="frozen"),
]

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    return MODELS[request.param]()


@pytest.fixture(params=POLICIES, ids=repr)
def policy(request: pytest.FixtureRequest) -> TransferPolicy:
    return request.param


def test_policy_labels_every_state_dict_key(policy: TransferPolicy, model: nn.Module) -> None:
    prepared = policy.prepare(model)
    plan = policy.plan(prepared)
    assert list(plan.labels) == list(prepared.state_dict())


def test_policy_labels_are_disjoint_and_cover_all_keys(
    policy: TransferPolicy, model: nn.Module
) -> None:
    prepared = policy.prepare(model)
    plan = policy.plan(prepared)
    groups = [plan.shared, plan.local, plan.frozen]
    assert sum(len(g) for g in groups) == len(prepared.state_dict())
    assert set().union(*map(set, groups)) == set(prepared.state_dict())


def test_policy_prepare_is_idempotent(policy: TransferPolicy, model: nn.Module) -> None:
    once = policy.prepare(model)
    once_keys, once_plan = list(once.state_dict()), policy.plan(once)
    twice = policy.prepare(policy.prepare(model))
    assert list(twice.state_dict()) == once_keys
    assert dict(policy.plan(twice).labels) == dict(once_plan.labels)
    assert policy.plan(twice).parameters == once_plan.parameters


def test_policy_trainable_is_subset_of_parameters(policy: TransferPolicy, model: nn.Module) -> None:
    plan = policy.plan(policy.prepare(model))
    assert plan.trainable <= plan.parameters
    assert plan.parameters == {name for name, _ in model.named_parameters()}


def test_policy_trainable_excludes_frozen_keys(policy: TransferPolicy, model: nn.Module) -> None:
    plan = policy.plan(policy.prepare(model))
    assert not plan.trainable & set(plan.frozen)


def test_policy_shares_at_least_one_key(policy: TransferPolicy, model: nn.Module) -> None:
    plan = policy.plan(policy.prepare(model))
    assert plan.shared


def test_headonly_shares_exactly_the_cnn_classifier() -> None:
    plan = HeadOnly().plan(CNN()())
    assert plan.shared == ("classifier.weight", "classifier.bias")
    assert not plan.local


def test_localbatchnorm_labels_all_batchnorm_keys_local() -> None:
    plan = LocalBatchNorm().plan(CNN()())
    expected = tuple(f"features.{i}.{s}" for i in (1, 5) for s in BN_SUFFIXES)
    assert plan.local == expected
    assert set(plan.shared) == set(plan.labels) - set(expected)


def test_localbatchnorm_without_batchnorm_raises_plan_error() -> None:
    with pytest.raises(PlanError, match="BatchNorm"):
        LocalBatchNorm().plan(_seq_plain())


def test_rules_unmatched_selector_lists_top_level_modules_and_near_misses() -> None:
    with pytest.raises(PlanError) as info:
        Rules(rules=(("clasifier", "shared"),)).plan(CNN()())
    message = str(info.value)
    assert "'clasifier'" in message
    assert "['features', 'embed', 'classifier']" in message
    assert "near misses" in message and "'classifier'" in message


def test_rules_unmatched_type_selector_lists_module_types() -> None:
    with pytest.raises(PlanError, match=r"module types .*'BatchNorm2d'.*'Linear'"):
        Rules(rules=(("type:Transformer", "shared"),)).plan(CNN()())


def test_rules_first_matching_rule_wins() -> None:
    plan = Rules(rules=(("classifier", "local"), ("type:Linear", "shared")), default="frozen").plan(
        CNN()()
    )
    assert plan.local == ("classifier.weight", "classifier.bias")
    assert plan.shared == ("embed.1.weight", "embed.1.bias")


def test_rules_first_matching_rule_wins_in_reverse_order() -> None:
    plan = Rules(rules=(("type:Linear", "shared"), ("classifier", "local")), default="frozen").plan(
        CNN()()
    )
    assert plan.local == ()
    assert plan.shared == ("embed.1.weight", "embed.1.bias", "classifier.weight", "classifier.bias")


def test_rules_default_labels_unmatched_keys() -> None:
    plan = Rules(rules=(("classifier", "shared"),), default="local").plan(CNN()())
    assert set(plan.local) == set(plan.labels) - {"classifier.weight", "classifier.bias"}


def test_rules_type_selector_matches_exact_class_name() -> None:
    plan = Rules(rules=(("type:Conv2d", "shared"),), default="frozen").plan(CNN()())
    assert plan.shared == ("features.0.weight", "features.4.weight")


def test_rules_type_selector_matches_base_class_name() -> None:
    plan = Rules(rules=(("type:_BatchNorm", "shared"),), default="frozen").plan(_seq_bn())
    assert plan.shared == tuple(f"1.{s}" for s in BN_SUFFIXES)


def test_rules_glob_selector_matches_dotted_keys() -> None:
    plan = Rules(rules=(("*.running_*", "local"),), default="shared").plan(CNN()())
    assert plan.local == (
        "features.1.running_mean",
        "features.1.running_var",
        "features.5.running_mean",
        "features.5.running_var",
    )


def test_rules_invalid_label_raises_plan_error() -> None:
    with pytest.raises(PlanError, match="label"):
        Rules(rules=(("classifier", "trained"),))  # type: ignore[arg-type]


def test_lastk_too_large_raises_plan_error() -> None:
    with pytest.raises(PlanError, match="only 4 blocks"):
        LastK(5).plan(CNN()())


def test_lastk_nonpositive_k_raises_plan_error() -> None:
    with pytest.raises(PlanError, match="k must be"):
        LastK(0)


def test_lastk_groups_batchnorm_with_the_preceding_layer() -> None:
    plan = LastK(2).plan(_seq_bn())
    assert set(plan.shared) == set(plan.labels)
    assert LastK(1).plan(_seq_bn()).shared == ("3.weight", "3.bias")


def test_personalhead_keeps_the_head_local() -> None:
    plan = PersonalHead().plan(CNN()())
    assert plan.local == ("classifier.weight", "classifier.bias")
    assert not plan.frozen
