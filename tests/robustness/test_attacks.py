"""Tests for simulated Byzantine attacks and the choice of malicious clients."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import pytest
import torch

from fedtransfer import tree
from fedtransfer.data.federated import TensorData
from fedtransfer.errors import ConfigError
from fedtransfer.robustness.attacks import (
    ALIE,
    IPM,
    Attack,
    GaussianAttack,
    LabelFlip,
    Scale,
    SignFlip,
)
from fedtransfer.robustness.threat import Threat

ALL_ATTACKS = [SignFlip(), Scale(), GaussianAttack(), LabelFlip(), ALIE(), IPM()]
POPULATION = [f"c{i:02d}" for i in range(20)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _update(w: list[float], b: float = 0.0, steps: int = 3) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor(w),
        "b": torch.tensor([b], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(steps),
    }


def _round() -> tuple[list[dict[str, torch.Tensor]], list[bool]]:
    updates = [_update([1.0, -2.0], 0.5, 1), _update([3.0, 0.0], 1.5, 2), _update([5.0, 4.0], 9, 7)]
    return updates, [False, False, True]


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: type(a).__name__)
def test_attack_implements_protocol(attack: Attack) -> None:
    """Both methods keep the layout (the examples and their shapes; the update's keys, shapes
    and dtypes), and the attack acts through at least one of them: it poisons the data or
    replaces the malicious update."""
    assert isinstance(attack, Attack)
    data = TensorData(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    poisoned = attack.poison(data, num_classes=3, generator=_gen())
    assert isinstance(poisoned, TensorData)
    assert poisoned.x.shape == data.x.shape and poisoned.y.shape == data.y.shape
    assert bool(((poisoned.y >= 0) & (poisoned.y < 3)).all())
    updates, malicious = _round()
    out = attack.corrupt(updates, malicious, generator=_gen())
    assert isinstance(out, list) and len(out) == len(updates)
    bad = out[malicious.index(True)]
    assert {k: (v.shape, v.dtype) for k, v in bad.items()} == {
        k: (v.shape, v.dtype) for k, v in updates[2].items()
    }
    poisons = not (torch.equal(poisoned.x, data.x) and torch.equal(poisoned.y, data.y))
    assert poisons or not tree.equal(bad, updates[2])


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: type(a).__name__)
def test_attack_returns_honest_entries_as_same_objects(attack: Attack) -> None:
    updates, malicious = _round()
    out = attack.corrupt(updates, malicious, generator=_gen())
    assert len(out) == 3
    assert out[0] is updates[0] and out[1] is updates[1]


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: type(a).__name__)
def test_attack_does_not_mutate_inputs(attack: Attack) -> None:
    updates, malicious = _round()
    before = [tree.clone(u) for u in updates]
    attack.corrupt(updates, malicious, generator=_gen())
    data = TensorData(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2]))
    attack.poison(data, num_classes=3, generator=_gen())
    assert all(tree.equal(u, b) for u, b in zip(updates, before, strict=True))
    assert torch.equal(data.y, torch.tensor([0, 1, 2]))
    assert torch.equal(data.x, torch.arange(6.0).reshape(3, 2))


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: type(a).__name__)
def test_attack_passes_integer_tensors_through(attack: Attack) -> None:
    updates, malicious = _round()
    out = attack.corrupt(updates, malicious, generator=_gen())
    assert out[2]["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out[2]["bn.num_batches_tracked"]) == 7
    assert out[2]["w"].dtype == torch.float32 and out[2]["b"].dtype == torch.float64


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: type(a).__name__)
def test_attack_rejects_length_mismatch(attack: Attack) -> None:
    updates, _ = _round()
    with pytest.raises(ValueError, match="3 updates but 2 malicious flags"):
        attack.corrupt(updates, [False, True], generator=_gen())


@pytest.mark.parametrize(
    "attack", ALL_ATTACKS[:3] + ALL_ATTACKS[4:], ids=lambda a: type(a).__name__
)
def test_model_attack_poison_returns_data_unchanged(attack: Attack) -> None:
    data = TensorData(torch.zeros(2, 1), torch.tensor([0, 1]))
    assert attack.poison(data, num_classes=2, generator=_gen()) is data


def test_signflip_negates_and_scales_own_update() -> None:
    updates, malicious = _round()
    out = SignFlip(scale=2.0).corrupt(updates, malicious, generator=_gen())
    assert torch.equal(out[2]["w"], torch.tensor([-10.0, -8.0]))
    assert torch.equal(out[2]["b"], torch.tensor([-18.0], dtype=torch.float64))


def test_scale_multiplies_own_update() -> None:
    updates, malicious = _round()
    out = Scale(factor=10.0).corrupt(updates, malicious, generator=_gen())
    assert torch.equal(out[2]["w"], torch.tensor([50.0, 40.0]))
    assert torch.equal(out[2]["b"], torch.tensor([90.0], dtype=torch.float64))


def test_gaussiannoise_matches_normal_draws_of_generator() -> None:
    updates, malicious = _round()
    out = GaussianAttack(sigma=0.5).corrupt(updates, malicious, generator=_gen(3))
    reference = _gen(3)
    w = 0.5 * torch.randn(2, generator=reference, dtype=torch.float64)
    b = 0.5 * torch.randn(1, generator=reference, dtype=torch.float64)
    assert torch.equal(out[2]["w"], w.float())
    assert torch.equal(out[2]["b"], b)


def test_gaussiannoise_reproducible_by_generator_seed() -> None:
    updates, malicious = _round()
    attack = GaussianAttack(sigma=1.0)
    a = attack.corrupt(updates, malicious, generator=_gen(7))
    b = attack.corrupt(updates, malicious, generator=_gen(7))
    c = attack.corrupt(updates, malicious, generator=_gen(8))
    assert tree.equal(a[2], b[2])
    assert not torch.equal(a[2]["w"], c[2]["w"])


def test_gaussiannoise_gives_each_malicious_client_its_own_noise() -> None:
    updates, _ = _round()
    out = GaussianAttack().corrupt(updates, [True, False, True], generator=_gen())
    assert not torch.equal(out[0]["w"], out[2]["w"])


def test_labelflip_maps_labels_and_keeps_inputs() -> None:
    data = TensorData(torch.randn(4, 3), torch.tensor([0, 1, 2, 4]))
    out = LabelFlip().poison(data, num_classes=5, generator=_gen())
    assert torch.equal(out.y, torch.tensor([4, 3, 2, 0]))
    assert out.y.dtype == data.y.dtype
    assert out.x is data.x


def test_labelflip_rejects_labels_out_of_range() -> None:
    data = TensorData(torch.zeros(2, 1), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"labels span \[0, 5\]"):
        LabelFlip().poison(data, num_classes=5, generator=_gen())


def test_labelflip_corrupt_returns_updates_unchanged() -> None:
    updates, malicious = _round()
    out = LabelFlip().corrupt(updates, malicious, generator=_gen())
    assert all(o is u for o, u in zip(out, updates, strict=True))


def test_alie_sends_mean_minus_z_std_of_honest_updates() -> None:
    updates, malicious = _round()
    out = ALIE(z=2.0).corrupt(updates, malicious, generator=_gen())
    # honest w: [1, 3] and [-2, 0] -> mean [2, -1], population std [1, 1]
    assert torch.equal(out[2]["w"], torch.tensor([0.0, -3.0]))
    # honest b: 0.5, 1.5 -> mean 1.0, std 0.5
    assert torch.equal(out[2]["b"], torch.tensor([0.0], dtype=torch.float64))


def test_alie_z_max_matches_hand_computation() -> None:
    # n=20, f=4: s = floor(20/2 + 1) - 4 = 7, z = Φ⁻¹((20 - 7) / 20) = Φ⁻¹(0.65)
    assert ALIE.z_max(20, 4) == pytest.approx(0.385320466407568, abs=1e-12)


def test_alie_default_z_uses_z_max() -> None:
    updates = [{"w": torch.tensor([float(i)], dtype=torch.float64)} for i in range(20)]
    malicious = [i >= 16 for i in range(20)]
    out = ALIE().corrupt(updates, malicious, generator=_gen())
    honest = torch.arange(16, dtype=torch.float64)
    expected = honest.mean() - statistics.NormalDist().inv_cdf(0.65) * honest.std(correction=0)
    assert torch.allclose(out[19]["w"], expected.reshape(1), rtol=0, atol=1e-12)
    assert out[16] is not out[19] and torch.equal(out[16]["w"], out[19]["w"])


def test_alie_z_max_is_finite_when_malicious_hold_majority() -> None:
    assert ALIE.z_max(10, 8) == pytest.approx(statistics.NormalDist().inv_cdf(0.9))
    assert ALIE.z_max(1, 1) == 0.0


def test_alie_stays_within_honest_range_for_small_z() -> None:
    honest = torch.randn(9, 50, generator=_gen(1)) ** 3
    updates = [{"w": h} for h in honest] + [{"w": torch.zeros(50)}]
    z = 1 / math.sqrt(len(honest) - 1)
    out = ALIE(z=z).corrupt(updates, [False] * 9 + [True], generator=_gen())
    lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
    assert bool((out[9]["w"] >= lo - 1e-6).all() and (out[9]["w"] <= hi + 1e-6).all())


def test_alie_falls_back_to_all_updates_when_all_malicious() -> None:
    updates = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}]
    out = ALIE(z=1.0).corrupt(updates, [True, True], generator=_gen())
    assert torch.equal(out[0]["w"], torch.tensor([0.0]))


def test_alie_rejects_mismatched_keys() -> None:
    updates = [{"w": torch.zeros(1)}, {"v": torch.zeros(1)}]
    with pytest.raises(ValueError, match="different key sets"):
        ALIE(z=1.0).corrupt(updates, [False, True], generator=_gen())


def test_ipm_sends_negative_epsilon_times_honest_mean() -> None:
    updates, malicious = _round()
    out = IPM(epsilon=0.5).corrupt(updates, malicious, generator=_gen())
    assert torch.equal(out[2]["w"], torch.tensor([-1.0, 0.5]))
    assert torch.equal(out[2]["b"], torch.tensor([-0.5], dtype=torch.float64))


def test_ipm_falls_back_to_all_updates_when_all_malicious() -> None:
    updates = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    out = IPM(epsilon=1.0).corrupt(updates, [True, True], generator=_gen())
    assert torch.equal(out[1]["w"], torch.tensor([-2.0]))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.3, 0.55, 0.95])
def test_threat_malicious_count_is_floor_of_fraction(fraction: float) -> None:
    chosen = Threat(SignFlip(), fraction).malicious(POPULATION, seed=0)
    assert len(chosen) == math.floor(fraction * 20 + 1e-9)
    assert chosen <= set(POPULATION)


def test_threat_malicious_deterministic_per_seed() -> None:
    threat = Threat(SignFlip(), 0.25)
    assert threat.malicious(POPULATION, seed=4) == threat.malicious(POPULATION, seed=4)


def test_threat_malicious_differs_across_seeds() -> None:
    threat = Threat(SignFlip(), 0.25)
    assert len({threat.malicious(POPULATION, seed=s) for s in range(5)}) > 1


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, math.nan, True])
def test_threat_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction must be in"):
        Threat(SignFlip(), fraction)


def test_threat_rejects_non_attack() -> None:
    with pytest.raises(ConfigError, match="must implement Attack"):
        Threat(object(), 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SignFlip(scale=math.inf), "scale must be a finite number > 0"),
        (lambda: SignFlip(scale=0.0), "scale must be a finite number > 0"),
        (lambda: Scale(factor=math.nan), "factor must be a finite number > 0"),
        (lambda: GaussianAttack(sigma=-1.0), "sigma must be a finite number >= 0"),
        (lambda: GaussianAttack(sigma=math.inf), "sigma must be a finite number >= 0"),
        (lambda: ALIE(z=-0.5), "z must be a finite number >= 0"),
        (lambda: IPM(epsilon=math.inf), "epsilon must be a finite number > 0"),
        (lambda: IPM(epsilon=0.0), "epsilon must be a finite number > 0"),
    ],
)
def test_attack_rejects_bad_settings(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()
