"""Heterogeneous LoRA ranks (HetLoRA) through ``run_round``: each client sends its rank's slice,
the server zero-pads before the weighted mean, and a slice of the wrong shape is rejected."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tests.conftest import NUM_CLASSES, make_tiny_model
from torch import Tensor

from fedtransfer import LocalTraining, Recipe, Reply, ServerState, UpdateContext, run_round, tree
from fedtransfer.algorithms import hetlora
from fedtransfer.codecs import Float32, Payload
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.transfer import HeadOnly
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.ranks import RankPad, RankTrim

pytestmark = pytest.mark.usefixtures("single_thread")

HET = Lora(rank=4, train=("head",))
PAD, TRIM = RankPad(4, (1, 2, 4)), RankTrim(4, (1, 2, 4))


def _het(recipe: Recipe) -> Recipe:
    return hetlora(recipe, ranks=(1, 2, 4))


RANKS = {"c0": 1, "c1": 4, "c2": 1, "c3": 4, "c4": 2, "c5": 2}
A, B = "body.1.lora_A", "body.1.lora_B"
LOCAL = LocalTraining(lr=0.2, steps=3, batch_size=8)
VICTIM = "c0"  # rank 1


def _population() -> FederatedDataset:
    """Six clients (two per rank) with different numbers of examples, so weights matter."""
    gen = torch.Generator().manual_seed(0)
    train, test = {}, {}
    for i, client in enumerate(RANKS):
        n = 10 + 6 * i
        x = torch.randn(n + 4, 1, 8, 8, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (n + 4,), generator=gen)
        x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float()
        train[client], test[client] = TensorData(x[:n], y[:n]), TensorData(x[n:], y[n:])
    return FederatedDataset(train, test, NUM_CLASSES)


@dataclass(frozen=True)
class RecordingRuntime:
    """The serial runtime; ``tamper`` may rewrite (or drop, returning None) the victim's result."""

    tamper: Callable[[Reply], Reply | None] | None = None
    results: list[Reply] = field(default_factory=list)

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        out = []
        for result in SerialRuntime().map(fn, tasks):
            if self.tamper is not None and result.client == VICTIM:
                result = self.tamper(result)
            if result is not None:
                out.append(result)
        self.results.extend(out)
        return out


def _start(recipe: Recipe) -> ServerState:
    """Round-0 state with a non-zero global ``lora_B``, so ``lora_A`` trains from step one."""
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    gen = torch.Generator().manual_seed(5)
    params = {**state.params, B: torch.randn(state.params[B].shape, generator=gen) * 0.3}
    return state.replace(params=params)


def _round(runtime: RecordingRuntime, recipe: Recipe | None = None) -> tuple[ServerState, Any]:
    recipe = recipe or _het(Recipe(policy=HET, training=LOCAL, sampler=AllClients()))
    state = _start(recipe)
    return state, run_round(recipe, state, _population(), runtime, model_fn=make_tiny_model)


def _decoded(result: Reply) -> dict[str, Tensor]:
    return Float32().decode(Payload.from_bytes(result.uplink))


def test_lora_ranks_population_covers_every_rank() -> None:
    assert {c: PAD.client_rank(c) for c in RANKS} == RANKS


def test_round_lora_ranks_each_client_sends_its_trimmed_payload() -> None:
    runtime = RecordingRuntime()
    old, (_, report) = _round(runtime)
    assert len(runtime.results) == len(RANKS) and not report.rejected
    sizes = {}
    for res in runtime.results:
        r = RANKS[res.client]
        update = _decoded(res)
        assert update[A].shape == (r, 64) and update[B].shape == (8, r), res.client
        ctx = UpdateContext({}, client=res.client)
        trimmed = {k: torch.zeros_like(v) for k, v in TRIM.apply(old.params, {}, ctx).value.items()}
        assert len(res.uplink) == len(Float32().encode(trimmed).to_bytes())
        sizes[r] = len(res.uplink)
    assert sizes[1] < sizes[2] < sizes[4]
    assert report.bytes_up == sum(len(res.uplink) for res in runtime.results)


def _padded(update: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Written out by hand (not with ``Lora.pad``): zeros in the slots the client lacks."""
    out = dict(update)
    a, b = torch.zeros(4, 64), torch.zeros(8, 4)
    a[:rank], b[:, :rank] = update[A], update[B]
    out[A], out[B] = a, b
    return out


def test_round_lora_ranks_aggregate_is_the_weighted_mean_of_zero_padded_updates() -> None:
    runtime = RecordingRuntime()
    old, (new, report) = _round(runtime)
    assert not report.rejected
    total = sum(res.num_examples for res in runtime.results)
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in old.params.items()}
    for res in runtime.results:
        padded = _padded(_decoded(res), RANKS[res.client])
        for k in expected:
            expected[k] += padded[k].double() * res.num_examples / total
    step = tree.sub(new.params, old.params)
    for k in expected:
        torch.testing.assert_close(step[k].double(), expected[k], rtol=1e-5, atol=1e-7)
    # rows 2-3 of lora_A are held by the rank-4 clients only; the others count as zero there
    # (mutation caught: averaging each slot over its holders only)
    high = [res for res in runtime.results if RANKS[res.client] == 4]
    holders = sum(res.num_examples for res in high)
    only_holders = sum(_decoded(res)[A][2:] * res.num_examples for res in high) / holders
    assert float(step[A][2:].abs().max()) > 1e-4
    assert not torch.allclose(step[A][2:], only_holders, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(step[A][2:], only_holders * holders / total, rtol=1e-5, atol=1e-7)


def _untrimmed(result: Reply) -> Reply:
    """The victim sends a full-rank update (its slice zero-padded) instead of its slice."""
    full = PAD.pad(_decoded(result), result.client)
    return dataclasses.replace(result, uplink=Float32().encode(full).to_bytes())


def _dropped(result: Reply) -> None:
    return None


def test_round_lora_ranks_rejects_an_untrimmed_update() -> None:
    _, (_, report) = _round(RecordingRuntime(_untrimmed))
    assert [c for c, _ in report.rejected] == [VICTIM]
    why = report.rejected[0][1]
    assert VICTIM in why and "shape (4, 64)" in why and "expected (1, 64)" in why
    assert VICTIM not in report.accepted and len(report.accepted) == len(RANKS) - 1


def test_round_lora_ranks_rejected_update_leaves_the_global_model_as_without_it() -> None:
    _, (tampered, report) = _round(RecordingRuntime(_untrimmed))
    _, (without, _) = _round(RecordingRuntime(_dropped))
    assert report.rejected
    assert tree.equal(tampered.params, without.params)
    assert VICTIM not in tampered.holdings.local and VICTIM not in tampered.holdings.memory


def test_round_staged_lora_ranks_trim_per_client_in_the_lora_stage() -> None:
    """A schedule's LoRA stage is a plain recipe: its ranks trim and pad per client."""
    base = Recipe(training=LOCAL, sampler=AllClients())
    recipe = Schedule(
        (
            (1, dataclasses.replace(base, policy=HeadOnly())),
            (None, _het(dataclasses.replace(base, policy=HET))),
        )
    )
    state = recipe.start(make_tiny_model(), seed=0)
    data = _population()
    state, _ = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
    runtime = RecordingRuntime()
    new, report = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    assert not report.rejected and list(new.params) == [A, B, "head.weight", "head.bias"]
    for res in runtime.results:
        update = _decoded(res)
        r = RANKS[res.client]
        assert update[A].shape == (r, 64) and update[B].shape == (8, r), res.client


def test_recipe_validate_refuses_scaffold_with_heterogeneous_ranks() -> None:
    """SCAFFOLD's full-rank correction would train slots a low-rank client does not hold."""
    from fedtransfer import CompatibilityError, Recipe
    from fedtransfer.client.drift import Scaffold

    recipe = Recipe(policy=Lora(rank=4, train=("head",)), objective=Scaffold())
    with pytest.raises(CompatibilityError, match="SCAFFOLD"):
        hetlora(recipe, ranks=(2, 4)).validate(make_tiny_model())
    Recipe(policy=Lora(rank=4, train=("head",)), objective=Scaffold()).validate(make_tiny_model())
