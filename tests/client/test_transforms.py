"""``ErrorFeedback``: the residual is what the uplink codec dropped, nothing is lost over rounds,
and through ``run_round`` the residual lives in the client's memory under ``transform/0/``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import RecordingRuntime, make_tiny_data, make_tiny_model
from torch import Tensor

from fedtransfer import (
    CompatibilityError,
    ConfigError,
    LocalTraining,
    Recipe,
    ServerState,
    run_round,
    tree,
)
from fedtransfer.client import ClientTask, client_update
from fedtransfer.client.drift import Scaffold
from fedtransfer.client.transforms import ErrorFeedback
from fedtransfer.codecs import Float32, Payload, TopK
from fedtransfer.server import ServerPipeline
from fedtransfer.state import load_state, save_state
from fedtransfer.transfer import Full
from fedtransfer.types import UpdateContext, UpdateTransform

pytestmark = pytest.mark.usefixtures("single_thread")

LOSSY = TopK(0.25)
LOCAL = LocalTraining(lr=0.1, steps=2, batch_size=8)
COHORTS = (("c0", "c1", "c2"), ("c1", "c2", "c3"), ("c0", "c3", "c4"))
PREFIX = "transform/0/"


@dataclass(frozen=True)
class Scripted:
    """A sampler whose cohort of round r is ``cohorts[r - 1]`` (in population order)."""

    cohorts: tuple[tuple[str, ...], ...] = COHORTS

    def sample(self, population: Sequence[str], *, seed: int, round: int) -> list[str]:
        return [c for c in population if c in self.cohorts[round - 1]]


def _update(seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(7, generator=gen)}


def _roundtrip(params: dict[str, Tensor], codec: Any = LOSSY) -> dict[str, Tensor]:
    return codec.decode(Payload.from_bytes(codec.encode(params).to_bytes()))


def _ctx(uplink: Any) -> UpdateContext:
    return UpdateContext({}, client="c0", uplink=uplink)


# --- the transform alone ---------------------------------------------------------------------


def test_error_feedback_is_a_client_transform() -> None:
    """Through a lossless uplink nothing is dropped: the update is sent as it is plus the
    residual kept, and the new residual is zero, for every floating key."""
    assert isinstance(ErrorFeedback(), UpdateTransform)
    update, residual = _update(0), _update(1)
    first = ErrorFeedback().apply(update, {}, _ctx(Float32()))
    assert tree.equal(first.value, update)
    assert tree.equal(first.state, tree.zeros_like(update))
    assert first.metrics["residual_norm"] == 0.0
    carried = ErrorFeedback().apply(update, residual, _ctx(Float32()))
    assert tree.equal(carried.value, tree.add(update, residual))
    assert tree.equal(carried.state, tree.zeros_like(update))


def test_error_feedback_sends_update_plus_residual_and_keeps_what_the_codec_dropped() -> None:
    update, residual = _update(0), _update(1)
    out = ErrorFeedback().apply(update, residual, _ctx(LOSSY))
    corrected = tree.add(update, residual)
    assert tree.equal(out.value, corrected)
    dropped = tree.sub(corrected, _roundtrip(corrected))
    assert tree.equal(out.state, dropped)
    assert all(bool(out.state[k].any()) for k in out.state)  # TopK(0.25) drops something
    assert out.metrics["residual_norm"] == pytest.approx(tree.global_norm(dropped), rel=1e-6)


def test_error_feedback_first_participation_sends_the_update_itself() -> None:
    update = _update(0)
    out = ErrorFeedback().apply(update, {}, _ctx(LOSSY))
    assert tree.equal(out.value, update)
    assert tree.equal(out.state, tree.sub(update, _roundtrip(update)))


def test_error_feedback_telescopes_sent_plus_final_residual_to_the_raw_sum() -> None:
    """Compression error is delayed, never lost (mutation caught: a residual that is reset or
    not added back, which loses the dropped mass)."""
    state: dict[str, Tensor] = {}
    raw_sum = tree.zeros_like(_update(0))
    sent_sum = tree.zeros_like(_update(0))
    for t in range(6):
        update = _update(10 + t)
        out = ErrorFeedback().apply(update, state, _ctx(LOSSY))
        sent_sum = tree.add(sent_sum, _roundtrip(out.value))
        raw_sum = tree.add(raw_sum, update)
        state = out.state
    total = tree.add(sent_sum, state)
    for k in raw_sum:
        torch.testing.assert_close(total[k], raw_sum[k], rtol=0, atol=1e-5)
    # without the feedback the dropped mass would be missing
    assert tree.global_norm(tree.sub(sent_sum, raw_sum)) > 0.5


def test_error_feedback_with_a_lossless_codec_changes_nothing() -> None:
    update = _update(0)
    out = ErrorFeedback().apply(update, {}, _ctx(Float32()))
    assert tree.equal(out.value, update)
    assert tree.equal(out.state, tree.zeros_like(update))
    assert out.metrics["residual_norm"] == 0.0


def test_error_feedback_keeps_no_residual_for_integer_tensors() -> None:
    update = {**_update(0), "steps": torch.tensor([3, 4], dtype=torch.int64)}
    out = ErrorFeedback().apply(update, {"steps": torch.tensor([9, 9])}, _ctx(LOSSY))
    assert torch.equal(out.value["steps"], update["steps"])  # not corrected either
    assert set(out.state) == {"w", "b"}


def test_recipe_validate_names_a_client_transform_that_is_not_one() -> None:
    recipe = Recipe(client_transforms=(ErrorFeedback(), "error_feedback"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Recipe\.client_transforms\[1\]"):
        recipe.validate(make_tiny_model())


def test_recipe_validate_refuses_error_feedback_where_no_uplink_is_given() -> None:
    """One protocol on both sides, but error feedback needs the uplink codec, which only a
    client transform is given."""
    for pipeline in (
        ServerPipeline(post=(ErrorFeedback(),)),
        ServerPipeline(per_client=(ErrorFeedback(),)),
    ):
        recipe = Recipe(pipeline=pipeline)
        with pytest.raises(ConfigError, match=r"needs \['uplink'\] in its context"):
            recipe.validate(make_tiny_model())
    with pytest.raises(ConfigError, match="no uplink codec in its context"):
        ErrorFeedback().apply(_update(0), {}, UpdateContext({}))


def test_client_transform_is_the_update_transform_under_its_former_name() -> None:
    import fedtransfer.client.transforms as transforms

    with pytest.warns(
        DeprecationWarning, match="ClientTransform is now fedtransfer.UpdateTransform"
    ):
        assert transforms.ClientTransform is UpdateTransform


# --- through run_round -----------------------------------------------------------------------


def _recipe(uplink: Any = LOSSY, objective: Any = None, transforms: tuple = (ErrorFeedback(),)):
    recipe = Recipe(
        policy=Full(),
        training=LOCAL,
        uplink=uplink,
        client_transforms=transforms,
        sampler=Scripted(),
    )
    return recipe if objective is None else replace(recipe, objective=objective)


def _rounds(
    recipe: Recipe, rounds: int, state: ServerState | None = None
) -> tuple[list[ServerState], list[RecordingRuntime]]:
    data = make_tiny_data()
    states = [state or ServerState.initial(recipe, make_tiny_model(), seed=0)]
    runtimes = []
    for _ in range(rounds):
        runtime = RecordingRuntime()
        new, report = run_round(recipe, states[-1], data, runtime, model_fn=make_tiny_model)
        assert not report.rejected
        states.append(new)
        runtimes.append(runtime)
    return states, runtimes


def _raw_update(recipe: Recipe, task: ClientTask) -> dict[str, Tensor]:
    """The client's update before any transform or lossy codec (same task, same seeds)."""
    plain = replace(recipe, uplink=Float32(), client_transforms=())
    result = client_update(task, recipe=plain, model_fn=make_tiny_model)
    return Float32().decode(Payload.from_bytes(result.uplink))


def _floats(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in params.items() if v.dtype.is_floating_point}


def test_round_error_feedback_keeps_the_residual_in_memory_under_transform_prefix() -> None:
    recipe = _recipe()
    states, runtimes = _rounds(recipe, 1)
    for task in runtimes[0].tasks:
        raw = _raw_update(recipe, task)
        expected = tree.sub(_floats(raw), _floats(_roundtrip(raw)))
        memory = states[1].holdings.memory[task.client]
        assert set(memory) == {PREFIX + k for k in expected}
        assert tree.equal({k[len(PREFIX) :]: v for k, v in memory.items()}, expected)
        assert tree.global_norm(expected) > 0


def test_round_error_feedback_adds_last_residual_to_the_next_update() -> None:
    recipe = _recipe()
    states, runtimes = _rounds(recipe, 2)
    for client in ("c1", "c2"):  # in both cohorts
        task = next(t for t in runtimes[1].tasks if t.client == client)
        before = {k[len(PREFIX) :]: v for k, v in states[1].holdings.memory[client].items()}
        assert tree.equal({k[len(PREFIX) :]: v for k, v in task.memory.items()}, before)
        raw = _raw_update(recipe, task)
        corrected = {k: v + before[k] if k in before else v for k, v in raw.items()}
        result = next(r for r in runtimes[1].results if r.client == client)
        assert tree.equal(LOSSY.decode(Payload.from_bytes(result.uplink)), _roundtrip(corrected))
        after = {k[len(PREFIX) :]: v for k, v in states[2].holdings.memory[client].items()}
        assert tree.equal(after, tree.sub(_floats(corrected), _floats(_roundtrip(corrected))))


def test_round_error_feedback_updates_only_the_cohort_memory() -> None:
    states, _ = _rounds(_recipe(), 2)
    assert set(states[1].holdings.memory) == {"c0", "c1", "c2"}
    assert set(states[2].holdings.memory) == {"c0", "c1", "c2", "c3"}
    assert tree.equal(
        states[2].holdings.memory["c0"], states[1].holdings.memory["c0"]
    )  # c0 sat out round 2
    assert not tree.equal(states[2].holdings.memory["c1"], states[1].holdings.memory["c1"])


def test_round_error_feedback_residual_survives_save_and_load(tmp_path: Path) -> None:
    recipe = _recipe()
    states, _ = _rounds(recipe, 3)
    save_state(states[1], tmp_path)
    loaded = load_state(tmp_path)
    assert set(loaded.holdings.memory) == set(states[1].holdings.memory)
    for client, memory in states[1].holdings.memory.items():
        assert tree.equal(loaded.holdings.memory[client], memory), client
    resumed, _ = _rounds(recipe, 2, state=loaded)
    assert tree.equal(resumed[-1].params, states[3].params)
    for client, memory in states[3].holdings.memory.items():
        assert tree.equal(resumed[-1].holdings.memory[client], memory), client


def test_round_error_feedback_with_a_lossless_uplink_is_plain_fedavg() -> None:
    with_ef, _ = _rounds(_recipe(uplink=Float32()), 2)
    without, _ = _rounds(_recipe(uplink=Float32(), transforms=()), 2)
    assert tree.equal(with_ef[-1].params, without[-1].params)
    assert all(not any(v.any() for v in m.values()) for m in with_ef[-1].holdings.memory.values())


def test_round_error_feedback_memory_coexists_with_scaffold_memory() -> None:
    states, _ = _rounds(_recipe(objective=Scaffold()), 2)
    float_keys = [k for k, v in states[0].params.items() if v.dtype.is_floating_point]
    for client in ("c1", "c2"):
        keys = set(states[2].holdings.memory[client])
        assert {k for k in keys if k.startswith(PREFIX)} == {PREFIX + k for k in float_keys}
        assert {k for k in keys if k.startswith("c/")}, client
        assert keys == {k for k in keys if k.startswith((PREFIX, "c/"))}


def test_round_error_feedback_leaves_scaffold_memory_as_without_it() -> None:
    """Lossless uplink: the transform's zero residual must not disturb SCAFFOLD's c_i (mutation
    caught: the transform memory replacing, or leaking into, the objective's memory)."""
    with_ef, _ = _rounds(_recipe(uplink=Float32(), objective=Scaffold()), 3)
    without, _ = _rounds(_recipe(uplink=Float32(), objective=Scaffold(), transforms=()), 3)
    assert tree.equal(with_ef[-1].params, without[-1].params)
    for client, memory in without[-1].holdings.memory.items():
        ours = {
            k: v for k, v in with_ef[-1].holdings.memory[client].items() if not k.startswith(PREFIX)
        }
        assert tree.equal(ours, memory), client


def test_recipe_validate_refuses_a_sparse_downlink() -> None:
    with pytest.raises(CompatibilityError, match=r"Recipe\.downlink: TopK"):
        Recipe(downlink=LOSSY).validate(make_tiny_model())


def test_recipe_validate_accepts_a_sparse_uplink_with_error_feedback() -> None:
    assert Recipe(uplink=LOSSY, client_transforms=(ErrorFeedback(),)).validate(make_tiny_model())
