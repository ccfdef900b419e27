"""Wire fuzzing: 2,000 seeded mutations of a real update per codec, read as the server reads
an update (decode against the plan ▸ validate). Every one ends as a ``PayloadError`` or an
``UpdateRejected`` — or, only for a flipped bit in the data, is still a valid update (what a
client could send anyway) — never another exception; through ``collect``, the global model
is untouched. The full 10,000-per-codec run
is ``benchmarks/fuzz.py`` (results in ``benchmarks/results/fuzz.md``)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_model

from fedtransfer import Recipe, Reply, ServerState, tree
from fedtransfer.codecs import BFloat16, Exact, Float16, Float32, Int8, TopK
from fedtransfer.codecs.mutate import MUTATIONS, fuzz, mutations
from fedtransfer.rounds.collect import collect
from fedtransfer.transfer import Full

CODECS = [Float32(), Exact(), Float16(), BFloat16(), Int8(), Int8("channel"), TopK(0.25)]
PER_CODEC = 2000


def _update(state: ServerState) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        k: torch.randn(v.shape, generator=gen) * 0.1 if v.is_floating_point() else v * 0 + 1
        for k, v in state.params.items()
    }


@pytest.fixture(scope="module")
def state() -> ServerState:
    return ServerState.initial(Recipe(policy=Full()), make_tiny_model(), seed=0)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_every_mutated_payload_is_refused_cleanly_or_is_a_valid_update(
    codec: object, state: ServerState
) -> None:
    got = fuzz(codec, _update(state), count=PER_CODEC, seed=0)
    assert got["tried"] == PER_CODEC
    assert got["other"] == 0, got["examples"]
    assert got["rejected"] + got["accepted"] == PER_CODEC
    # only a flipped bit in the data can leave a valid update (a value a client could send)
    assert set(got["accepted_by_kind"]) <= {"flip_bits"}, got["accepted_by_kind"]
    assert got["rejected"] >= 0.8 * PER_CODEC
    assert set(got["by_kind"]) == set(MUTATIONS)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_mutated_replies_through_collect_leave_the_global_model_untouched(
    codec: object, state: ServerState
) -> None:
    recipe = Recipe(policy=Full(), uplink=codec)  # type: ignore[arg-type]
    plan = recipe.plan(make_tiny_model())
    before = tree.sha256(state.params)
    base = codec.encode(_update(state)).to_bytes()  # type: ignore[attr-defined]
    replies = [Reply(f"c{i}", data, 10) for i, (_, data) in enumerate(mutations(base, 300, seed=1))]
    got = collect(recipe, state, replies, plan=plan)
    assert len(got.accepted) + len(got.rejected) == len(replies)
    assert tree.sha256(state.params) == before


def test_mutations_are_seeded() -> None:
    base = Float32().encode({"w": torch.ones(3)}).to_bytes()
    assert list(mutations(base, 50, seed=3)) == list(mutations(base, 50, seed=3))
    assert list(mutations(base, 50, seed=3)) != list(mutations(base, 50, seed=4))
