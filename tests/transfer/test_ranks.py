"""Heterogeneous LoRA ranks (HetLoRA): client ranks, and the three wrappers that narrow, trim
and pad (:mod:`fedtransfer.transfer.ranks`), and the recipe check that keeps them together."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from torch import Tensor

from fedtransfer import (
    CompatibilityError,
    LocalTraining,
    Recipe,
    UpdateContext,
    UpdateRejected,
    UpdateTransform,
    tree,
)
from fedtransfer.algorithms import hetlora
from fedtransfer.client import ErrorFeedback
from fedtransfer.client.train import local_train
from fedtransfer.data import TensorData
from fedtransfer.errors import ConfigError, PlanError
from fedtransfer.models import CNN
from fedtransfer.seeding import generator
from fedtransfer.server import ClipNorm
from fedtransfer.transfer import Full
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.ranks import RankNarrow, RankPad, RankTrim
from fedtransfer.types import StartStep

pytestmark = pytest.mark.usefixtures("single_thread")

POLICY = Lora(rank=4, train=("head",))
NARROW, TRIM, HET = RankNarrow(4, (1, 2, 4)), RankTrim(4, (1, 2, 4)), RankPad(4, (1, 2, 4))


def _narrow(step: RankNarrow, weights: dict[str, Tensor], client: str) -> dict[str, Tensor]:
    return step.apply(weights, UpdateContext({}, client=client))


def _trim(update: dict[str, Tensor], client: str) -> dict[str, Tensor]:
    return TRIM.apply(update, TRIM.init({}), UpdateContext({}, client=client)).value


LORA_KEYS = tuple(f"{p}.lora_{f}" for p in ("features.0", "features.4", "embed.1") for f in "AB")


def _client_with_rank(policy: RankNarrow | RankTrim | RankPad, rank: int) -> str:
    return next(c for c in (f"c{i}" for i in range(1000)) if policy.client_rank(c) == rank)


def _random_weights(policy: Lora = POLICY) -> dict[str, Tensor]:
    """A prepared CNN's state dict with every LoRA factor filled with non-zero values."""
    weights = tree.clone(policy.prepare(CNN().init(0)).state_dict())
    gen = torch.Generator().manual_seed(3)
    for k in LORA_KEYS:
        weights[k] = torch.randn(weights[k].shape, generator=gen) * 0.1
    return weights


def test_lora_client_rank_is_deterministic_and_spread_over_ranks() -> None:
    clients = [f"client-{i}" for i in range(200)]
    first = [HET.client_rank(c) for c in clients]
    again = [RankNarrow(rank=4, ranks=(1, 2, 4)).client_rank(c) for c in clients]
    assert first == again == [TRIM.client_rank(c) for c in clients]
    counts = Counter(first)
    assert set(counts) == {1, 2, 4}
    assert min(counts.values()) > 40


def test_rank_steps_are_the_protocols_of_their_places_and_need_a_client() -> None:
    assert isinstance(NARROW, StartStep)
    assert isinstance(TRIM, UpdateTransform) and isinstance(HET, UpdateTransform)
    update = {"m.lora_A": torch.ones(4, 3)}
    for call in (
        lambda: NARROW.apply(update, UpdateContext({})),
        lambda: TRIM.apply(update, {}, UpdateContext({})),
        lambda: HET.apply(update, {}, UpdateContext({})),
    ):
        with pytest.raises(CompatibilityError, match="no client in its context"):
            call()


@pytest.mark.parametrize(
    ("rank", "ranks", "match"),
    [
        (4, (2, 5), r"outside 1..rank=4"),
        (4, (0, 4), r"outside 1..rank=4"),
        (4, (1, 2), r"max\(ranks\) = 2"),
        (4, (), r"ranks is empty"),
        (0, (1,), r"rank must be an integer >= 1"),
        (4, [2, 4], r"ranks must be a tuple of integers"),
    ],
)
def test_rank_steps_refuse_bad_ranks(rank: int, ranks: tuple[int, ...], match: str) -> None:
    for cls in (RankNarrow, RankTrim, RankPad):
        with pytest.raises(PlanError, match=match):
            cls(rank, ranks)


def test_lora_truncate_zeros_the_slots_a_client_does_not_hold() -> None:
    client = _client_with_rank(HET, 2)
    weights = _random_weights()
    held = _narrow(NARROW, weights, client)
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
    weights = _random_weights()
    assert tree.equal(_narrow(NARROW, weights, client), weights)


def test_lora_trim_cuts_factors_to_the_client_rank() -> None:
    client = _client_with_rank(HET, 1)
    update = _random_weights()
    sent = _trim(update, client)
    assert sent["embed.1.lora_A"].shape == (1, 32 * 7 * 7)
    assert sent["embed.1.lora_B"].shape == (64, 1)
    assert sent["features.4.lora_A"].shape == (1, 16 * 3 * 3)
    assert torch.equal(sent["features.4.lora_B"], update["features.4.lora_B"][:, :1])
    assert sent["classifier.weight"] is update["classifier.weight"]


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_lora_trim_then_pad_round_trips_a_truncated_update(rank: int) -> None:
    client = _client_with_rank(HET, rank)
    update = _narrow(NARROW, _random_weights(), client)
    ctx = UpdateContext(update, client=client)
    back = HET.apply(_trim(update, client), HET.init(update), ctx).value
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


@pytest.mark.parametrize("ffa", [False, True])
def test_lora_sgd_on_a_truncated_client_keeps_the_missing_slots_zero(ffa: bool) -> None:
    policy, narrow = Lora(rank=4, ffa=ffa, train=("head",)), RankNarrow(4, (2, 4))
    client = _client_with_rank(narrow, 2)
    model = policy.prepare(CNN().init(0))
    start = _narrow(narrow, _random_weights(policy), client)
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


def _het(**changes: object) -> Recipe:
    return hetlora(Recipe(policy=POLICY, **changes), ranks=(1, 2, 4))  # type: ignore[arg-type]


def test_hetlora_puts_the_three_steps_first_in_their_places() -> None:
    recipe = _het(client_transforms=(ErrorFeedback(),))
    assert recipe.client_start == (NARROW,)
    assert recipe.client_transforms == (TRIM, ErrorFeedback())
    assert recipe.pipeline.per_client == (HET,)
    recipe.validate(CNN().init(0))


def test_hetlora_refuses_a_policy_that_is_not_lora() -> None:
    with pytest.raises(ConfigError, match="hetlora: the recipe's policy must be a Lora"):
        hetlora(Recipe(policy=Full()), ranks=(2, 4))


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (  # the pad left out: the server would validate trimmed updates against full shapes
            dataclasses.replace(
                _het(), pipeline=dataclasses.replace(_het().pipeline, per_client=())
            ),
            "exactly one RankNarrow",
        ),
        (  # steps of different ranks
            dataclasses.replace(_het(), client_start=(RankNarrow(4, (2, 4)),)),
            "the same rank and ranks",
        ),
        (  # the adapter's rank is not the largest client rank
            dataclasses.replace(_het(), policy=Lora(rank=2, train=("head",))),
            "need a Lora policy of rank 4",
        ),
        (  # a clip before the pad would see trimmed shapes
            dataclasses.replace(
                _het(),
                pipeline=dataclasses.replace(_het().pipeline, per_client=(ClipNorm(1.0), HET)),
            ),
            "RankPad must be the first per-client step",
        ),
        (  # error feedback before the trim would keep full-rank residuals
            dataclasses.replace(_het(), client_transforms=(ErrorFeedback(), TRIM)),
            "RankTrim must be the first client transform",
        ),
    ],
    ids=["no-pad", "mixed-ranks", "policy-rank", "pad-not-first", "trim-not-first"],
)
def test_recipe_validate_refuses_incomplete_or_misplaced_rank_steps(
    recipe: Recipe, match: str
) -> None:
    with pytest.raises(CompatibilityError, match=match):
        recipe.validate(CNN().init(0))
