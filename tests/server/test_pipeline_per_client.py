"""``ServerPipeline``'s per-client stage: each update passes through every ``per_client``
transform (``ServerPipeline.admit``, which the round runs in ``collect`` before validating)
before the aggregator, and each transform's state lives under ``per_client/<i>/``.

Each test here fails if the per-client stage is skipped or reordered: the unit tests drive
``admit`` ▸ ``apply`` as ``collect`` and ``aggregate`` do, the round test goes through
``run_round``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_data, make_tiny_model
from torch import Tensor

from fedtransfer import LocalTraining, Recipe, ServerState, run_round, tree
from fedtransfer.codecs import Float32, Payload
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients, Mean, ServerPipeline, ServerSGD
from fedtransfer.state import load_state, save_state
from fedtransfer.transfer import Full
from fedtransfer.types import Out, Params, State, UpdateContext, UpdateTransform


@dataclass(frozen=True)
class Scale:
    """Multiplies the floating tensors of an update by ``factor``; counts, in its state, the
    updates it has transformed (``seen``, a 0-d int64 tensor)."""

    factor: float

    def init(self, params: Params) -> State:
        return {"seen": torch.zeros((), dtype=torch.int64)}

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        out = {k: v * self.factor if v.is_floating_point() else v for k, v in update.items()}
        return Out(out, {"seen": state["seen"] + 1}, {"factor": self.factor})


@dataclass(frozen=True)
class Clip:
    """Scales an update's floating tensors so that their global L2 norm is at most ``c``;
    stateless."""

    c: float

    def init(self, params: Params) -> State:
        return {}

    def apply(self, update: Params, state: State, ctx: UpdateContext) -> Out[dict[str, Tensor]]:
        floats = {k: v for k, v in update.items() if v.is_floating_point()}
        factor = min(1.0, self.c / max(tree.global_norm(floats), 1e-12))
        out = {k: v * factor if v.is_floating_point() else v for k, v in update.items()}
        return Out(out, {})


def _params() -> dict[str, Tensor]:
    return {"w": torch.zeros(2), "steps": torch.tensor(0, dtype=torch.int64)}


def _updates() -> list[dict[str, Tensor]]:
    """Two updates of norms 3 and 4 (their mean, [1.5, 2.0], has norm 2.5)."""
    return [
        {"w": torch.tensor([3.0, 0.0]), "steps": torch.tensor(2, dtype=torch.int64)},
        {"w": torch.tensor([0.0, 4.0]), "steps": torch.tensor(2, dtype=torch.int64)},
    ]


def _step(
    pipe: ServerPipeline, state: State | None = None, updates: list[dict[str, Tensor]] | None = None
) -> Out[dict[str, Tensor]]:
    """Each update admitted in turn (the state threaded through), then the rest."""
    params = _params()
    state = pipe.init(params) if state is None else state
    admitted = []
    for i, update in enumerate(_updates() if updates is None else updates):
        out = pipe.admit(update, state, UpdateContext(params, client=f"c{i}"))
        admitted.append(out.value)
        state = out.state
    return pipe.apply(admitted, [1.0, 1.0], params=params, state=state)


def test_the_test_transforms_are_update_transforms() -> None:
    assert isinstance(Scale(0.0), UpdateTransform) and isinstance(Clip(1.0), UpdateTransform)
    ctx = UpdateContext(_params())
    out = Scale(2.0).apply({"w": torch.ones(2)}, Scale(2.0).init(_params()), ctx)
    assert torch.equal(out.value["w"], torch.full((2,), 2.0)) and int(out.state["seen"]) == 1


def test_without_per_client_transforms_the_step_is_the_mean() -> None:
    """The baseline the tests below differ from."""
    assert torch.equal(_step(ServerPipeline()).value["w"], torch.tensor([1.5, 2.0]))


def test_a_per_client_scale_by_zero_gives_a_zero_step() -> None:
    out = _step(ServerPipeline(per_client=(Scale(0.0),)))
    assert torch.equal(out.value["w"], torch.zeros(2))
    assert torch.equal(out.value["steps"], torch.tensor(2))  # integer tensors pass through


def test_per_client_clipping_clips_each_update_before_the_mean() -> None:
    """Each update clipped to norm 1 gives ([1, 0] + [0, 1]) / 2; clipping the mean instead
    (a per-client stage run after the aggregator) would give [0.6, 0.8]."""
    out = _step(ServerPipeline(per_client=(Clip(1.0),)))
    torch.testing.assert_close(out.value["w"], torch.tensor([0.5, 0.5]))


def test_per_client_transforms_run_in_order_then_the_server_optimiser() -> None:
    """Scale by 2, then clip to 1: ([1, 0] + [0, 1]) / 2; clip then scale would give [1, 1];
    the server optimiser (lr 0.5) scales the aggregate afterwards."""
    pipe = ServerPipeline(per_client=(Scale(2.0), Clip(1.0)), post=(ServerSGD(lr=0.5),))
    torch.testing.assert_close(_step(pipe).value["w"], torch.tensor([0.25, 0.25]))
    swapped = ServerPipeline(per_client=(Clip(1.0), Scale(2.0)), post=(ServerSGD(lr=0.5),))
    torch.testing.assert_close(_step(swapped).value["w"], torch.tensor([0.5, 0.5]))


def test_per_client_state_is_namespaced_and_read_back_each_round() -> None:
    pipe = ServerPipeline(per_client=(Scale(1.0), Clip(1.0), Scale(1.0)), aggregator=Mean())
    state = pipe.init(_params())
    assert set(state) == {"per_client/0/seen", "per_client/2/seen"}
    assert int(state["per_client/0/seen"]) == 0 and int(state["per_client/2/seen"]) == 0
    for round in (1, 2, 3):
        out = _step(pipe, state)
        # two updates a round, counted by each transform in its own namespace
        assert set(out.state) == {"per_client/0/seen", "per_client/2/seen"}
        assert int(out.state["per_client/0/seen"]) == 2 * round
        assert int(out.state["per_client/2/seen"]) == 2 * round
        assert out.state["per_client/0/seen"].dtype == torch.int64
        state = out.state
    # a state not read from its namespace would start from the one given: here 10
    given = {**state, "per_client/0/seen": torch.tensor(10)}
    assert int(_step(pipe, given).state["per_client/0/seen"]) == 12
    assert int(_step(pipe, given).state["per_client/2/seen"]) == 8


def test_apply_passes_the_per_client_state_through_and_admit_changes_only_it() -> None:
    pipe = ServerPipeline(per_client=(Scale(2.0),), post=(ServerSGD(lr=0.5, momentum=0.5),))
    params = _params()
    state = pipe.init(params)
    admitted = pipe.admit(_updates()[0], state, UpdateContext(params, client="c0"))
    assert {k for k in state if not tree.equal({k: state[k]}, {k: admitted.state[k]})} == {
        "per_client/0/seen"
    }
    assert admitted.metrics == {"per_client/0/factor": 2.0}
    out = pipe.apply([admitted.value], [1.0], params=params, state=admitted.state)
    assert torch.equal(out.state["per_client/0/seen"], torch.tensor(1))
    assert set(out.state) == set(state)


def test_the_input_state_and_updates_are_not_mutated() -> None:
    pipe = ServerPipeline(per_client=(Scale(0.0),))
    params = _params()
    state, updates = pipe.init(params), _updates()
    before = (tree.clone(state), [tree.clone(u) for u in updates])
    _step(pipe, state, updates)
    assert tree.equal(state, before[0])
    assert all(tree.equal(u, b) for u, b in zip(updates, before[1], strict=True))


@pytest.mark.usefixtures("single_thread")
def test_a_round_with_a_zeroing_per_client_transform_keeps_the_model_and_its_state(
    tmp_path: Path,
) -> None:
    """Through ``run_round``: the global weights do not move, and the transform's state is in
    the server state under ``per_client/0/`` and survives a checkpoint."""
    data = make_tiny_data()
    local = LocalTraining(lr=0.1, steps=2, batch_size=8)
    zeroing = Recipe(
        policy=Full(),
        training=local,
        sampler=AllClients(),
        pipeline=ServerPipeline(per_client=(Scale(0.0),)),
    )
    plain = Recipe(policy=Full(), training=local, sampler=AllClients())
    start = ServerState.initial(zeroing, make_tiny_model(), seed=0)
    assert int(start.server["per_client/0/seen"]) == 0

    state, _ = run_round(zeroing, start, data, SerialRuntime(), model_fn=make_tiny_model)
    moved, _ = run_round(
        plain,
        ServerState.initial(plain, make_tiny_model(), seed=0),
        data,
        SerialRuntime(),
        model_fn=make_tiny_model,
    )
    floats = [k for k, v in start.params.items() if v.is_floating_point()]
    assert all(torch.equal(state.params[k], start.params[k]) for k in floats)
    assert not all(torch.equal(moved.params[k], start.params[k]) for k in floats)
    assert int(state.server["per_client/0/seen"]) == len(data.clients)

    save_state(state, tmp_path / "ckpt")
    loaded = load_state(tmp_path / "ckpt")
    assert tree.equal(loaded.server, state.server)
    again, _ = run_round(zeroing, loaded, data, SerialRuntime(), model_fn=make_tiny_model)
    assert int(again.server["per_client/0/seen"]) == 2 * len(data.clients)


@dataclass(frozen=True)
class NaNFor:
    """The serial runtime, with client ``victim``'s update replaced by one holding a NaN (it
    decodes, is admitted by the per-client steps, then fails validation)."""

    victim: str

    def map(self, fn, tasks):  # type: ignore[no-untyped-def]
        out = []
        for rep in SerialRuntime().map(fn, tasks):
            if rep.client == self.victim:
                update = Float32().decode(Payload.from_bytes(rep.uplink))
                first = next(iter(update))
                update[first] = torch.full_like(update[first], float("nan"))
                rep = replace(rep, uplink=Float32().encode(update).to_bytes())
            out.append(rep)
        return out


@pytest.mark.usefixtures("single_thread")
def test_a_per_client_step_keeps_its_state_only_for_the_updates_the_round_accepts() -> None:
    """``collect`` admits each update, then validates it: the state a rejected update would
    have left (here one more count) is dropped, and so are its metrics."""
    data = make_tiny_data()
    recipe = Recipe(
        training=LocalTraining(lr=0.1, steps=2, batch_size=8),
        sampler=AllClients(),
        pipeline=ServerPipeline(per_client=(Scale(1.0),)),
    )
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    victim = data.clients[1]
    state, report = run_round(recipe, start, data, NaNFor(victim), model_fn=make_tiny_model)
    assert [c for c, _ in report.rejected] == [victim] and "non-finite" in report.rejected[0][1]
    assert int(state.server["per_client/0/seen"]) == len(data.clients) - 1
    assert report.metrics["server/per_client/0/factor"] == len(data.clients) - 1
