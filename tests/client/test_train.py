"""The local training loop: only the plan's trainable keys move; deterministic in its generator."""

from __future__ import annotations

import pytest
import torch

from fedtransfer import tree
from fedtransfer.client.train import LocalTraining, local_train
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.models import CNN
from fedtransfer.seeding import generator
from fedtransfer.transfer import Full, HeadOnly, LastK


def _data(n: int = 24) -> TensorData:
    g = torch.Generator().manual_seed(0)
    return TensorData(
        torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("policy", [HeadOnly(), LastK(2)], ids=repr)
def test_local_train_changes_only_trainable_keys(policy):
    model = CNN().init(0)
    plan = policy.plan(model)
    before = tree.clone(model.state_dict())
    local_train(
        model, plan, _data(), LocalTraining(lr=0.1, epochs=1, batch_size=8), generator=generator(0)
    )
    changed = _changed(before, model.state_dict())
    assert changed, "training changed nothing"
    assert all(plan.labels[k] != "frozen" for k in changed)
    # frozen BatchNorm statistics stay put because frozen modules run in eval mode
    assert "features.1.running_mean" not in changed


def test_local_train_full_updates_batchnorm_statistics():
    model = CNN().init(0)
    before = tree.clone(model.state_dict())
    local_train(model, Full().plan(model), _data(), LocalTraining(epochs=1), generator=generator(0))
    changed = _changed(before, model.state_dict())
    assert {
        "features.1.running_mean",
        "features.1.num_batches_tracked",
        "classifier.weight",
    } <= changed


def test_local_train_is_deterministic_in_its_generator():
    spec = LocalTraining(optimizer="adam", lr=1e-3, steps=4, batch_size=5)
    runs = []
    for _ in range(2):
        model = CNN().init(1)
        local_train(model, Full().plan(model), _data(), spec, generator=generator(7, "x"))
        runs.append(tree.clone(model.state_dict()))
    assert tree.equal(runs[0], runs[1])
    model = CNN().init(1)
    local_train(model, Full().plan(model), _data(), spec, generator=generator(8, "x"))
    assert not tree.equal(runs[0], model.state_dict())


@pytest.mark.parametrize(
    ("spec", "steps"),
    [
        (LocalTraining(epochs=2, batch_size=10), 6),
        (LocalTraining(steps=5, batch_size=10), 5),
    ],
)
def test_local_train_counts_epochs_and_steps(spec, steps):
    model = CNN().init(0)
    metrics = local_train(model, Full().plan(model), _data(24), spec, generator=generator(0))
    assert metrics["steps"] == steps


def test_local_train_leaves_requires_grad_restored():
    model = CNN().init(0)
    local_train(model, HeadOnly().plan(model), _data(), LocalTraining(), generator=generator(0))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"momentum": 1.0},
        {"epochs": 0},
        {"lr": 0.0},
        {"batch_size": 0},
        {"optimizer": "rmsprop"},
    ],
)
def test_local_training_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        LocalTraining(**kwargs)
