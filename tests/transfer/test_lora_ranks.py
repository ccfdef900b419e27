"""Heterogeneous LoRA ranks (HetLoRA): client ranks, truncate, trim and pad."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import Tensor

from fedtransfer import LocalTraining, UpdateRejected, tree
from fedtransfer.client.train import local_train
from fedtransfer.data import TensorData
from fedtransfer.models import CNN
from fedtransfer.seeding import generator
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.plan import PerClientRank

pytestmark = pytest.mark.usefixtures("single_thread")

HET = Lora(rank=4, ranks=(1, 2, 4), train=("head",))
LORA_KEYS = tuple(f"{p}.lora_{f}" for p in ("features.0", "features.4", "embed.1") for f in "AB")


def _client_with_rank(policy: Lora, rank: int) -> str:
    return next(c for c in (f"c{i}" for i in range(1000)) if policy.client_rank(c) == rank)


def _random_weights(policy: Lora) -> dict[str, Tensor]:
    """A prepared CNN's state dict with every LoRA factor filled with non-zero values."""
    weights = tree.clone(policy.prepare(CNN().init(0)).state_dict())
    gen = torch.Generator().manual_seed(3)
    for k in LORA_KEYS:
        weights[k] = torch.randn(weights[k].shape, generator=gen) * 0.1
    return weights


def test_lora_client_rank_is_deterministic_and_spread_over_ranks() -> None:
    clients = [f"client-{i}" for i in range(200)]
    first = [HET.client_rank(c) for c in clients]
    again = [Lora(rank=4, ranks=(1, 2, 4)).client_rank(c) for c in clients]
    assert first == again
    counts = Counter(first)
    assert set(counts) == {1, 2, 4}
    assert min(counts.values()) > 40


def test_lora_client_rank_without_ranks_is_the_rank() -> None:
    assert {Lora(rank=3).client_rank(f"c{i}") for i in range(20)} == {3}


def test_lora_implements_per_client_rank() -> None:
    assert isinstance(HET, PerClientRank)


def test_lora_truncate_zeros_the_slots_a_client_does_not_hold() -> None:
    client = _client_with_rank(HET, 2)
    weights = _random_weights(HET)
    held = HET.truncate(weights, client)
    for k in LORA_KEYS:
        if k.endswith("lora_A"):
            assert torch.equal(held[k][:2], weights[k][:2]) and not held[k][2:].any(), k
        else:
            assert torch.equal(held[k][:, :2], weights[k][:, :2]) and not held[k][:, 2:].any(), k
    others = [k for k in weights if k not in LORA_KEYS]
    assert all(held[k] is weights[k] for k in others)
    assert weights["embed.1.lora_A"][2:].all()  # the input is not modified


def test_lora_truncate_full_rank_client_keeps_everything() -> None:
    client = _client_with_rank(HET, 4)
    weights = _random_weights(HET)
    assert tree.equal(HET.truncate(weights, client), weights)


def test_lora_trim_cuts_factors_to_the_client_rank() -> None:
    client = _client_with_rank(HET, 1)
    update = _random_weights(HET)
    sent = HET.trim(update, client)
    assert sent["embed.1.lora_A"].shape == (1, 32 * 7 * 7)
    assert sent["embed.1.lora_B"].shape == (64, 1)
    assert sent["features.4.lora_A"].shape == (1, 16 * 3 * 3)
    assert torch.equal(sent["features.4.lora_B"], update["features.4.lora_B"][:, :1])
    assert sent["classifier.weight"] is update["classifier.weight"]


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_lora_trim_then_pad_round_trips_a_truncated_update(rank: int) -> None:
    client = _client_with_rank(HET, rank)
    update = HET.truncate(_random_weights(HET), client)
    back = HET.pad(HET.trim(update, client), client, reference=update)
    assert list(back) == list(update)
    assert tree.equal(back, update)


def test_lora_pad_fills_slots_the_client_does_not_hold_with_zeros() -> None:
    client = _client_with_rank(HET, 2)
    padded = HET.pad({"m.lora_A": torch.ones(2, 5), "m.lora_B": torch.ones(3, 2)}, client)
    assert torch.equal(padded["m.lora_A"], torch.tensor([[1.0] * 5] * 2 + [[0.0] * 5] * 2))
    assert torch.equal(padded["m.lora_B"], torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3))


@pytest.mark.parametrize(
    ("key", "shape"), [("m.lora_A", (4, 5)), ("m.lora_B", (3, 1)), ("m.lora_A", (2,))]
)
def test_lora_pad_rejects_a_wrong_shape_naming_client_key_and_shapes(
    key: str, shape: tuple[int, ...]
) -> None:
    client = _client_with_rank(HET, 2)
    with pytest.raises(UpdateRejected, match=rf"client {client}: '{key}' has shape") as info:
        HET.pad({key: torch.zeros(shape)}, client)
    assert str(shape) in str(info.value) and "expected (" in str(info.value)
    assert info.value.client == client


def test_lora_pad_with_reference_rejects_a_wrong_fan_in() -> None:
    client = _client_with_rank(HET, 1)
    reference = {"m.lora_A": torch.zeros(4, 5)}
    with pytest.raises(UpdateRejected, match=r"shape \(1, 6\), expected \(1, 5\)"):
        HET.pad({"m.lora_A": torch.zeros(1, 6)}, client, reference=reference)


def test_lora_without_ranks_truncate_trim_and_pad_are_identities() -> None:
    policy = Lora(rank=4, train=("head",))
    weights = _random_weights(policy)
    for out in (
        policy.truncate(weights, "c0"),
        policy.trim(weights, "c0"),
        policy.pad(weights, "c0"),
    ):
        assert list(out) == list(weights)
        assert all(out[k] is weights[k] for k in weights)


@pytest.mark.parametrize("ffa", [False, True])
def test_lora_sgd_on_a_truncated_client_keeps_the_missing_slots_zero(ffa: bool) -> None:
    policy = Lora(rank=4, ranks=(2, 4), ffa=ffa, train=("head",))
    client = _client_with_rank(policy, 2)
    model = policy.prepare(CNN().init(0))
    start = policy.truncate(_random_weights(policy), client)
    model.load_state_dict(start)
    gen = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,)))
    spec = LocalTraining(lr=0.05, steps=3, batch_size=8, momentum=0.5, weight_decay=1e-3)
    local_train(model, policy.plan(model), data, spec, generator=generator(0, "t", client))
    after = model.state_dict()
    for k in LORA_KEYS:
        kept, dropped = _split(after[k], k, 2)
        assert not dropped.any(), k
        trains = k.endswith("B") or not ffa
        assert trains != torch.equal(kept, _split(start[k], k, 2)[0]), k


def _split(value: Tensor, key: str, r: int) -> tuple[Tensor, Tensor]:
    """(held, not held) slots of a LoRA factor for a rank-``r`` client."""
    if key.endswith("lora_A"):
        return value[:r], value[r:]
    return value[:, :r], value[:, r:]


def test_lora_weighted_mean_of_padded_updates_counts_missing_slots_as_zero() -> None:
    """The documented aggregation: slot j's mean is over all clients, zeros where not held."""
    low, full = _client_with_rank(HET, 1), _client_with_rank(HET, 4)
    sent = {low: {"m.lora_B": torch.full((3, 1), 2.0)}, full: {"m.lora_B": torch.ones(3, 4)}}
    padded = [HET.pad(u, c) for c, u in sent.items()]
    mean = tree.weighted_mean(padded, [1.0, 1.0])["m.lora_B"]
    assert torch.equal(mean, torch.tensor([[1.5, 0.5, 0.5, 0.5]] * 3))
