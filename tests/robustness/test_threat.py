"""Simulated threats inside ``run_round``: who is malicious, what the server then aggregates.

Client results are deterministic per (seed, round, client), so a threat-free round with the
same seed gives each client's honest update, from which the attacked round is rebuilt by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tests.conftest import make_tiny_model
from torch import Tensor

from fedtransfer import Recipe, Reply, ServerState, run_round, tree
from fedtransfer.codecs import Float32, Payload
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.robustness.attacks import GaussianAttack, LabelFlip, SignFlip
from fedtransfer.robustness.threat import Threat
from fedtransfer.rounds.finalize import RoundReport
from fedtransfer.server import Uniform

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class RecordingRuntime:
    """The serial runtime, keeping every client result it returns (in task order)."""

    results: list[Reply] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        out = [fn(t) for t in tasks]
        self.results.extend(out)
        return out

    def uplinks(self) -> dict[str, bytes]:
        return {r.client: r.uplink for r in self.results}


def _round(
    recipe: Recipe,
    data: FederatedDataset,
    threat: Threat | None = None,
    runtime: RecordingRuntime | None = None,
) -> tuple[ServerState, ServerState, RoundReport, RecordingRuntime]:
    runtime = runtime or RecordingRuntime()
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    new, report = run_round(recipe, start, data, runtime, model_fn=make_tiny_model, threat=threat)
    return start, new, report, runtime


def _floats(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in params.items() if v.dtype.is_floating_point}


def test_threat_malicious_is_a_seeded_floor_fraction_of_the_population(
    tiny_data: FederatedDataset,
) -> None:
    threat = Threat(SignFlip(), fraction=0.4)
    chosen = threat.malicious(tiny_data.clients, seed=0)
    assert len(chosen) == 2 and chosen <= set(tiny_data.clients)
    assert threat.malicious(tiny_data.clients, seed=0) == chosen
    assert len({threat.malicious(tiny_data.clients, seed=s) for s in range(8)}) > 1


def test_threat_malicious_does_not_depend_on_the_attack(tiny_data: FederatedDataset) -> None:
    flip = Threat(SignFlip(), fraction=0.4).malicious(tiny_data.clients, seed=3)
    labels = Threat(LabelFlip(), fraction=0.4).malicious(tiny_data.clients, seed=3)
    assert flip == labels


def test_run_round_reports_the_malicious_clients_in_the_cohort(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    _, _, report, _ = _round(tiny_recipe, tiny_data, Threat(SignFlip(), fraction=0.4))
    assert report.metrics["attack/malicious"] == 2.0


def test_run_round_counts_only_sampled_malicious_clients(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    recipe = Recipe(policy=tiny_recipe.policy, training=tiny_recipe.training, sampler=Uniform(2))
    threat = Threat(SignFlip(), fraction=0.4)
    bad = threat.malicious(tiny_data.clients, seed=0)
    _, _, report, _ = _round(recipe, tiny_data, threat)
    assert report.metrics["attack/malicious"] == float(len(set(report.cohort) & bad))


def test_run_round_without_threat_reports_no_malicious_clients(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    _, _, report, _ = _round(tiny_recipe, tiny_data)
    assert report.metrics["attack/malicious"] == 0.0


def test_run_round_sign_flip_step_is_the_mean_with_malicious_updates_negated(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    """Mean aggregation, server lr 1: θ' = θ + Σ_i p_i s_i Δ_i with s_i = −1 for the malicious."""
    threat = Threat(SignFlip(), fraction=0.4)
    bad = threat.malicious(tiny_data.clients, seed=0)
    start, _, _, honest = _round(tiny_recipe, tiny_data)
    _, attacked, report, _ = _round(tiny_recipe, tiny_data, threat)
    assert sorted(report.accepted) == sorted(tiny_data.clients)
    updates = {c: Float32().decode(Payload.from_bytes(u)) for c, u in honest.uplinks().items()}
    sizes = {c: len(tiny_data.train[c]) for c in tiny_data.clients}
    total = sum(sizes.values())
    for k, theta in _floats(start.params).items():
        step = torch.zeros(theta.shape, dtype=torch.float64)
        for c in tiny_data.clients:
            sign = -1.0 if c in bad else 1.0
            step += sign * updates[c][k].double() * (sizes[c] / total)
        expected = theta + step.to(theta.dtype)
        torch.testing.assert_close(attacked.params[k], expected, rtol=1e-6, atol=1e-7)


def test_run_round_sign_flip_moves_away_from_the_honest_round(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    start, clean, _, _ = _round(tiny_recipe, tiny_data)
    _, attacked, _, _ = _round(tiny_recipe, tiny_data, Threat(SignFlip(), fraction=0.4))
    honest_step = tree.global_norm(_floats(tree.sub(clean.params, start.params)))
    attacked_step = tree.global_norm(_floats(tree.sub(attacked.params, start.params)))
    assert attacked_step < honest_step  # two of five updates cancel two others


def _flip_labels(data: FederatedDataset, clients: frozenset[str]) -> FederatedDataset:
    k = data.num_classes
    train = {c: TensorData(d.x, k - 1 - d.y) if c in clients else d for c, d in data.train.items()}
    return FederatedDataset(train, dict(data.test), k)


def test_run_round_label_flip_malicious_clients_train_on_flipped_labels(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    threat = Threat(LabelFlip(), fraction=0.4)
    bad = threat.malicious(tiny_data.clients, seed=0)
    _, attacked, _, poisoned = _round(tiny_recipe, tiny_data, threat)
    _, by_hand, _, flipped = _round(tiny_recipe, _flip_labels(tiny_data, bad))
    assert poisoned.uplinks() == flipped.uplinks()
    assert tree.equal(attacked.params, by_hand.params)


def test_run_round_label_flip_changes_only_malicious_updates(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    threat = Threat(LabelFlip(), fraction=0.4)
    bad = threat.malicious(tiny_data.clients, seed=0)
    _, _, _, clean = _round(tiny_recipe, tiny_data)
    _, _, _, poisoned = _round(tiny_recipe, tiny_data, threat)
    before, after = clean.uplinks(), poisoned.uplinks()
    for c in tiny_data.clients:
        assert (before[c] == after[c]) == (c not in bad), c


def test_run_round_label_flip_leaves_the_population_data_untouched(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    labels = {c: tiny_data.train[c].y.clone() for c in tiny_data.clients}
    _round(tiny_recipe, tiny_data, Threat(LabelFlip(), fraction=0.4))
    assert all(torch.equal(tiny_data.train[c].y, labels[c]) for c in tiny_data.clients)


@pytest.mark.parametrize("attack", [SignFlip(), LabelFlip(), GaussianAttack(1.0)], ids=repr)
def test_run_round_threat_with_zero_fraction_changes_nothing(
    attack: Any, tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    _, clean, clean_report, clean_rt = _round(tiny_recipe, tiny_data)
    _, none, report, rt = _round(tiny_recipe, tiny_data, Threat(attack, fraction=0.0))
    assert tree.equal(none.params, clean.params)
    assert tree.equal(none.server, clean.server)
    assert none.ledger == clean.ledger
    assert rt.uplinks() == clean_rt.uplinks()
    assert report.metrics["attack/malicious"] == 0.0
    assert report.accepted == clean_report.accepted


def test_run_round_gaussian_noise_attack_is_seeded(
    tiny_recipe: Recipe, tiny_data: FederatedDataset
) -> None:
    threat = Threat(GaussianAttack(0.01), fraction=0.4)
    _, a, _, _ = _round(tiny_recipe, tiny_data, threat)
    _, b, _, _ = _round(tiny_recipe, tiny_data, threat)
    _, clean, _, _ = _round(tiny_recipe, tiny_data)
    assert tree.equal(a.params, b.params)
    assert not tree.equal(a.params, clean.params)
