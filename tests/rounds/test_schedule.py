"""Schedules of recipes (``Schedule``): stage arithmetic, validation, hand-over keys, and staged
runs through ``run_round``: bytes per stage, the rebase at a stage boundary, the hand-over of
keys that stopped being shared, and resume across the boundary."""

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
from fedtransfer.codecs import Exact, Float32, Payload
from fedtransfer.data import FederatedDataset
from fedtransfer.rounds.buffered import FedBuff, run_buffered_step
from fedtransfer.rounds.schedule import Schedule, begin_round
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients, ServerAdam, ServerPipeline
from fedtransfer.state import load_state, save_state
from fedtransfer.transfer import FrozenHead, Full, HeadOnly, PersonalHead, Rules
from fedtransfer.transfer.plan import TransferPolicy

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD = ("head.weight", "head.bias")
BODY = tuple(k for k in make_tiny_model().state_dict() if k not in HEAD)
LOCAL = LocalTraining(lr=0.1, steps=2, batch_size=8)
NOTHING = Rules(default="frozen")


@dataclass(frozen=True)
class Scripted:
    """A sampler whose cohort of round r is ``cohorts[r - 1]`` (in population order)."""

    cohorts: tuple[tuple[str, ...], ...]

    def sample(self, population: Sequence[str], *, seed: int, round: int) -> list[str]:
        return [c for c in population if c in self.cohorts[round - 1]]


# rounds 1-2: FedBABU body under a frozen head; from round 3 the head alone (the body freezes)
BABU_COHORTS = (("c0", "c1", "c2"), ("c0", "c1"), ("c0", "c3"), ("c0", "c1", "c3", "c4"))


def _staged(base: Recipe, *stages: tuple[int | None, TransferPolicy]) -> Schedule:
    """``base`` under each policy in turn."""
    return Schedule(tuple((rounds, replace(base, policy=p)) for rounds, p in stages))


def _babu(cohorts: tuple[tuple[str, ...], ...] = BABU_COHORTS, **changes: Any) -> Schedule:
    base = Recipe(**{"training": LOCAL, "sampler": Scripted(cohorts), **changes})
    return _staged(base, (2, FrozenHead()), (None, HeadOnly()))


def _lp_ft(**changes: Any) -> Schedule:
    base = Recipe(**{"training": LOCAL, "sampler": AllClients(), **changes})
    return _staged(base, (2, HeadOnly()), (None, Full()))


def _start(schedule: Schedule) -> ServerState:
    return schedule.start(make_tiny_model(), seed=0)


def _begin(schedule: Schedule, state: ServerState) -> tuple[Recipe, ServerState]:
    return begin_round(schedule, state, model_fn=schedule.prepared(make_tiny_model))


def _handover(schedule: Schedule, since: int, now: int) -> tuple[str, ...]:
    """The keys a set-up client holding stage ``since``'s start lacks in stage ``now``."""
    state = _start(schedule).distributed(stage=now, set_up=("c",), synced={"c": since})
    lacking = schedule.handover(state, ["c"], model_fn=schedule.prepared(make_tiny_model))
    return lacking.get("c", ())


def _run(
    recipe: Schedule,
    data: FederatedDataset,
    rounds: int,
    state: ServerState | None = None,
    runtime: Any = None,
) -> ServerState:
    state = state or _start(recipe)
    for _ in range(rounds):
        state, _ = run_round(
            recipe, state, data, runtime or SerialRuntime(), model_fn=make_tiny_model
        )
    return state


def _nbytes(codec: Any, params: dict[str, Tensor]) -> int:
    return len(codec.encode(params).to_bytes())


# --- Schedule -----------------------------------------------------------------------------


def test_schedule_index_at_maps_rounds_to_stages() -> None:
    schedule = _staged(Recipe(), (2, HeadOnly()), (3, Full()), (None, FrozenHead()))
    assert [schedule.index_at(r) for r in range(1, 8)] == [0, 0, 1, 1, 1, 2, 2]
    assert schedule.index_at(1000) == 2
    assert [schedule.first_round(i) for i in range(3)] == [1, 3, 6]


def test_schedule_index_at_after_the_last_finite_stage_stays_in_it() -> None:
    schedule = _staged(Recipe(), (1, HeadOnly()), (2, Full()))
    assert [schedule.index_at(r) for r in (1, 2, 3, 4, 9)] == [0, 1, 1, 1, 1]


def test_schedule_recipe_at_is_the_stage_recipe_itself() -> None:
    head, full = Recipe(policy=HeadOnly(), objective=Scaffold()), Recipe(training=LOCAL)
    schedule = Schedule(((1, head), (None, full)))
    assert schedule.recipe_at(1) is head and schedule.recipe_at(2) is full


@pytest.mark.parametrize("rounds", [0, -1, True, 1.5, "3"])
def test_schedule_rejects_rounds_that_are_not_a_positive_integer(rounds: Any) -> None:
    with pytest.raises(ConfigError, match=r"Schedule\.stages\[0\]: rounds must be"):
        Schedule(((rounds, Recipe()), (None, Recipe())))


def test_schedule_rejects_an_open_ended_stage_before_the_last() -> None:
    with pytest.raises(ConfigError, match=r"Schedule\.stages\[0\]: only the last stage"):
        Schedule(((None, Recipe()), (None, Recipe())))


def test_schedule_rejects_a_nested_schedule() -> None:
    inner = Schedule(((None, Recipe()),))
    with pytest.raises(ConfigError, match=r"Schedule\.stages\[1\]: expected a Recipe"):
        Schedule(((1, Recipe()), (None, inner)))  # type: ignore[arg-type]


def test_schedule_rejects_an_empty_schedule() -> None:
    with pytest.raises(ConfigError, match="at least one stage"):
        Schedule(())


def test_schedule_rejects_an_entry_that_is_not_a_stage() -> None:
    with pytest.raises(ConfigError, match=r"Schedule\.stages\[1\]: expected a pair"):
        Schedule(((1, Recipe()), Recipe()))  # type: ignore[arg-type]


def test_schedule_prepared_factory_is_the_factory_itself_for_one_stage() -> None:
    """A plain recipe runs on the caller's own factory (so worker caches and the default run
    are untouched); a staged one on a factory that compares equal from call to call."""
    one = Schedule(((None, Recipe()),))
    assert one.prepared(make_tiny_model) is make_tiny_model
    two = _lp_ft()
    assert two.prepared(make_tiny_model) == two.prepared(make_tiny_model)
    assert two.prepared(make_tiny_model) is not make_tiny_model


def test_schedule_handover_is_the_keys_shared_since_and_not_shared_now() -> None:
    schedule = _staged(Recipe(), (1, FrozenHead()), (1, HeadOnly()), (None, Full()))
    assert _handover(schedule, 0, 1) == BODY  # body shared in 0, frozen in 1
    assert _handover(schedule, 1, 1) == ()
    assert _handover(schedule, 0, 2) == ()  # everything is shared again in 2
    assert _handover(schedule, 1, 2) == ()


def test_schedule_handover_collects_every_stage_since_without_duplicates() -> None:
    """Full, then the body, then the head alone: a client from stage 0 lacks the body (shared
    in 0 and 1) but not the head; one from stage 1 lacks the body too."""
    schedule = _staged(Recipe(), (1, Full()), (1, FrozenHead()), (None, HeadOnly()))
    assert _handover(schedule, 0, 2) == BODY
    assert _handover(schedule, 1, 2) == BODY
    # mutation caught: counting only stage ``since`` (not every stage up to now - 1)
    late = _staged(Recipe(), (1, HeadOnly()), (1, FrozenHead()), (None, HeadOnly()))
    assert _handover(late, 0, 2) == BODY


def test_schedule_handover_skips_clients_not_set_up_or_not_behind() -> None:
    schedule = _staged(Recipe(), (1, FrozenHead()), (None, HeadOnly()))
    state = _start(schedule).distributed(stage=1, set_up=("a", "b"), synced={"a": 0, "b": 1})
    got = schedule.handover(state, ["a", "b", "new"], model_fn=schedule.prepared(make_tiny_model))
    assert got == {"a": BODY}


def test_config_stages_change_only_the_recipe_fields_they_give() -> None:
    from fedtransfer.experiment.factories import StageList, StageSpec

    local = LocalTraining(lr=0.3, steps=1, batch_size=4)
    base = Recipe(training=LOCAL, uplink=Exact())
    spec = StageList((StageSpec(1, HeadOnly(), Scaffold(), local), StageSpec(None, Full())))
    schedule = spec.build(base)
    first, second = schedule.recipe_at(1), schedule.recipe_at(2)
    assert first.policy == HeadOnly() and first.objective == Scaffold() and first.training == local
    assert first.uplink == Exact()  # not given: the arm's
    assert second == replace(base, policy=Full())


# --- LP→FT through run_round ---------------------------------------------------------------


def test_round_lp_ft_bytes_are_the_shared_payload_of_each_stage() -> None:
    data = make_tiny_data()
    recipe = _lp_ft()
    state = _start(recipe)
    everything = state.weights_for()
    head_bytes = _nbytes(Float32(), tree.select(everything, HEAD))
    all_bytes = _nbytes(Float32(), everything)
    n = len(data.clients)
    expected = [head_bytes, head_bytes, all_bytes, all_bytes]
    for r, per_client in enumerate(expected, start=1):
        state, report = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
        assert report.bytes_up == n * per_client, r
        assert report.bytes_down == n * per_client, r  # HeadOnly → Full: nothing handed over
        assert report.metrics["schedule/stage"] == (0.0 if r <= 2 else 1.0)
    assert head_bytes < all_bytes


def test_begin_round_keeps_the_aggregated_head_when_fine_tuning_begins() -> None:
    data = make_tiny_data()
    recipe = _lp_ft()
    lp = _run(recipe, data, 2)
    initial = _start(recipe)
    assert not tree.equal(lp.params, initial.params)  # the probe moved the head
    _, ft = _begin(recipe, lp)
    assert ft.distribution.stage == 1 and list(ft.params) == list(make_tiny_model().state_dict())
    assert tree.equal(tree.select(ft.params, HEAD), lp.params)
    assert tree.equal(tree.select(ft.params, BODY), tree.select(initial.distribution.start, BODY))
    assert tree.equal(ft.distribution.start, lp.weights_for())


def test_begin_round_stage_change_rehashes_the_starting_weights() -> None:
    data = make_tiny_data()
    lp = _run(_lp_ft(), data, 2)
    _, ft = _begin(_lp_ft(), lp)
    assert ft.distribution.start_sha256 != lp.distribution.start_sha256
    assert ft.distribution.start_sha256 == tree.sha256(ft.distribution.start)


def test_begin_round_stage_change_restarts_server_state_for_the_new_shared_keys() -> None:
    recipe = _lp_ft(objective=Scaffold(), pipeline=ServerPipeline(post=(ServerAdam(lr=0.05),)))
    lp = _run(recipe, make_tiny_data(), 2)
    assert any(float(v.abs().sum()) > 0 for v in lp.server.values())
    current, ft = _begin(recipe, lp)
    fresh = current.pipeline.init(ft.params)
    objective = Scaffold().server_init(ft.params, Full().plan(make_tiny_model()))
    fresh.update({f"objective/{k}": v for k, v in objective.items()})
    assert sorted(ft.server) == sorted(fresh)
    assert any(k.endswith("body.1.weight") for k in ft.server)
    assert all(torch.equal(ft.server[k], fresh[k]) for k in fresh)


def test_begin_round_stage_change_clears_client_memory() -> None:
    recipe = _lp_ft(objective=Scaffold())
    lp = _run(recipe, make_tiny_data(), 2)
    assert set(lp.holdings.memory) == set(make_tiny_data().clients)  # SCAFFOLD's c_i per client
    _, ft = _begin(recipe, lp)
    assert ft.holdings.memory == {}


def test_begin_round_inside_a_stage_leaves_the_state_alone() -> None:
    recipe = _lp_ft()
    one = _run(recipe, make_tiny_data(), 1)
    current, same = _begin(recipe, one)
    assert same is one
    assert current is recipe.recipe_at(1) and current.policy == HeadOnly()


# --- shared → frozen: the hand-over ---------------------------------------------------------


def _babu_rounds(rounds: int) -> tuple[list[ServerState], list[Any], list[RecordingRuntime]]:
    """States after 0..rounds rounds of the FedBABU→head schedule, reports and runtimes."""
    data = make_tiny_data()
    recipe = _babu()
    states = [_start(recipe)]
    reports, runtimes = [], []
    for _ in range(rounds):
        runtime = RecordingRuntime()
        state, report = run_round(recipe, states[-1], data, runtime, model_fn=make_tiny_model)
        states.append(state)
        reports.append(report)
        runtimes.append(runtime)
    return states, reports, runtimes


def _task(runtime: RecordingRuntime, client: str) -> ClientTask:
    return next(t for t in runtime.tasks if t.client == client)


def test_round_handover_bytes_are_counted_in_bytes_down() -> None:
    states, reports, _ = _babu_rounds(3)
    body_now = tree.select(states[2].weights_for(), BODY)  # aggregated over rounds 1-2
    handover = _nbytes(Exact(), body_now)
    downlink = _nbytes(Float32(), tree.select(states[2].weights_for(), HEAD))
    # round 3: c0 (set up in stage 0) gets the hand-over, c3 (new) the set-up
    assert reports[2].bytes_down == 2 * downlink + handover
    assert reports[2].setup_bytes == _nbytes(Exact(), states[2].weights_for())
    assert states[3].ledger["down"] == states[2].ledger["down"] + reports[2].bytes_down


def test_round_handover_carries_the_aggregated_body() -> None:
    states, _, runtimes = _babu_rounds(3)
    task = _task(runtimes[2], "c0")
    assert task.handover is not None and task.setup is None
    handed = Exact().decode(Payload.from_bytes(task.handover))
    assert list(handed) == list(BODY)
    assert tree.equal(handed, tree.select(states[2].params, BODY))
    assert not tree.equal(handed, tree.select(states[0].distribution.start, BODY))


def test_round_handover_goes_to_each_client_once_on_its_first_stage_participation() -> None:
    states, reports, runtimes = _babu_rounds(4)
    got = [{t.client for t in rt.tasks if t.handover is not None} for rt in runtimes]
    assert got == [set(), set(), {"c0"}, {"c1"}]  # c2 never returns; c3, c4 start in stage 1
    downlink = _nbytes(Float32(), states[3].params)
    handover = _nbytes(Exact(), tree.select(states[3].distribution.start, BODY))
    assert reports[3].bytes_down == 4 * downlink + handover
    assert states[4].distribution.synced == {c: 1 for c in ("c0", "c1", "c3", "c4")} | {"c2": 0}


def test_round_client_new_in_a_later_stage_gets_the_setup_and_no_handover() -> None:
    states, reports, runtimes = _babu_rounds(4)
    assert tree.equal(
        states[3].distribution.start, states[2].weights_for()
    )  # stage-1 start: aggregated body
    for r, client in ((3, "c3"), (4, "c4")):
        task = _task(runtimes[r - 1], client)
        assert task.handover is None and task.setup is not None
        start = Exact().decode(Payload.from_bytes(task.setup))
        assert tree.equal(start, states[3].distribution.start)
        assert tree.sha256(start) == task.start_sha256
        assert reports[r - 1].setup_bytes == len(task.setup)


def test_round_client_trains_the_new_stage_from_the_aggregated_body() -> None:
    """c0's round-3 result equals a fresh client's given the aggregated weights outright."""
    states, _, runtimes = _babu_rounds(3)
    weights = states[2].weights_for()
    recipe = _babu().recipe_at(3)
    direct = ClientTask(
        client="c0",
        round=3,
        seed=0,
        downlink=Float32().encode(tree.select(weights, HEAD)).to_bytes(),
        data=make_tiny_data().train["c0"],
        local={},
        frozen={},
        start_sha256=tree.sha256(weights),
        setup=Exact().encode(weights).to_bytes(),
    )
    expected = client_update(direct, recipe=recipe, model_fn=make_tiny_model)
    seen = next(r for r in runtimes[2].results if r.client == "c0")
    assert seen.uplink == expected.uplink
    # and it differs from training on the pre-trained body (mutation: stale frozen keys)
    stale = _start(_babu()).weights_for()
    stale = {**stale, **tree.select(weights, HEAD)}
    old = replace(direct, setup=Exact().encode(stale).to_bytes(), start_sha256=tree.sha256(stale))
    assert client_update(old, recipe=recipe, model_fn=make_tiny_model).uplink != seen.uplink


# --- checkpoints ----------------------------------------------------------------------------


def test_save_state_round_trips_stage_and_synced(tmp_path: Path) -> None:
    states, _, _ = _babu_rounds(3)
    save_state(states[3], tmp_path)
    back = load_state(tmp_path)
    assert back.distribution.stage == 1 == states[3].distribution.stage
    assert (
        back.distribution.synced
        == states[3].distribution.synced
        == {"c0": 1, "c1": 0, "c2": 0, "c3": 1}
    )


@pytest.mark.parametrize("resume_after", [1, 2, 3])
def test_staged_run_resumed_from_a_checkpoint_is_bit_identical(
    resume_after: int, tmp_path: Path
) -> None:
    recipe = _babu(pipeline=ServerPipeline(post=(ServerAdam(0.05),)))
    data = make_tiny_data()
    straight = _run(recipe, data, 4)
    save_state(_run(recipe, data, resume_after), tmp_path)
    resumed = _run(recipe, data, 4 - resume_after, state=load_state(tmp_path))
    assert tree.equal(resumed.params, straight.params)
    assert tree.equal(resumed.distribution.start, straight.distribution.start)
    assert (
        resumed.ledger == straight.ledger
        and resumed.distribution.synced == straight.distribution.synced
    )


# --- validation -----------------------------------------------------------------------------


def test_schedule_validate_names_the_stage_that_shares_nothing() -> None:
    schedule = _staged(Recipe(), (1, HeadOnly()), (None, NOTHING))
    with pytest.raises(CompatibilityError, match=r"Schedule\.stages\[1\]: .*shares no keys"):
        schedule.validate(make_tiny_model())


def test_schedule_validate_accepts_every_stage_that_shares_something() -> None:
    plan = _babu().validate(make_tiny_model(), population=make_tiny_data().clients)
    assert plan.shared == BODY


def test_run_buffered_step_refuses_a_staged_recipe() -> None:
    recipe = _lp_ft()
    state = _start(recipe)
    with pytest.raises(CompatibilityError, match="schedule of 2 stages"):
        run_buffered_step(
            recipe,
            state,
            make_tiny_data(),
            SerialRuntime(),
            model_fn=make_tiny_model,
            fedbuff=FedBuff(buffer_size=2, concurrency=3),
        )


# --- review fixes: the hand-over is what the client trains from; stale local keys -------------


def test_round_client_behind_a_stage_lacks_the_handover_keys_until_it_decodes_them() -> None:
    _, _, runtimes = _babu_rounds(3)
    task = _task(runtimes[2], "c0")
    assert not set(BODY) & set(task.frozen)  # the body reaches c0 only through its hand-over
    recipe = _babu().recipe_at(3)
    reply = client_update(replace(task, handover=None), recipe=recipe, model_fn=make_tiny_model)
    assert reply.error.startswith("failed: RuntimeError") and "Missing key" in reply.error


def test_round_handover_of_a_key_that_became_local_reaches_the_client_local_keys() -> None:
    # stage 0 shares everything; stage 1 keeps the head local (FedPer): c0 holds a stale head
    cohorts = (("c0", "c1"), ("c1",), ("c0",))
    recipe = _staged(
        Recipe(training=LOCAL, sampler=Scripted(cohorts)), (1, Full()), (None, PersonalHead())
    )
    data = make_tiny_data()
    state = _start(recipe)
    runtime = RecordingRuntime()
    for _ in range(3):
        state, _ = run_round(recipe, state, data, runtime, model_fn=make_tiny_model)
    task = next(t for t in runtime.tasks if t.client == "c0" and t.round == 3)
    handed = Exact().decode(Payload.from_bytes(task.handover or b""))
    assert set(HEAD) <= set(handed) and not set(HEAD) & set(task.local)


def test_begin_round_drops_stored_local_keys_that_are_no_longer_local() -> None:
    recipe = _staged(
        Recipe(training=LOCAL, sampler=AllClients()), (1, PersonalHead()), (None, Full())
    )
    state = _run(recipe, make_tiny_data(), 1)
    assert all(set(held) == set(HEAD) for held in state.holdings.local.values())
    _, entered = _begin(recipe, state)
    assert all(held == {} for held in entered.holdings.local.values())
    # every client now evaluates with the global head, not its old personal one
    for c in entered.holdings.local:
        assert tree.equal(
            tree.select(entered.weights_for(c), HEAD), tree.select(entered.params, HEAD)
        )


def test_schedule_validate_refuses_lora_stages_of_different_ranks() -> None:
    from fedtransfer.errors import PlanError
    from fedtransfer.transfer import Lora

    schedule = _staged(Recipe(), (1, Lora(rank=2)), (None, Lora(rank=4)))
    with pytest.raises(PlanError, match="already has a LoRA adapter of rank 2"):
        schedule.validate(make_tiny_model())


@pytest.mark.parametrize(
    "arm",
    ["{name: a, mode: local-only}", "{name: a, fedbuff: {buffer_size: 2, concurrency: 3}}"],
)
def test_experiment_config_refuses_stages_outside_the_synchronous_loop(arm: str) -> None:
    from fedtransfer.experiment.run import load_config

    staged = "{kind: lp_ft, head_rounds: 1}"
    with pytest.raises(ConfigError, match="a staged schedule"):
        load_config(None, [f"schedule={staged}", f"arms=[{arm}]"])


def test_experiment_config_builds_each_named_schedule_on_the_arm_recipe() -> None:
    from fedtransfer.experiment.run import load_config

    cfg = load_config(
        None,
        [
            "arms=[{name: lp, schedule: {kind: lp_ft, head_rounds: 2}}, "
            "{name: ncm, schedule: {kind: fedncm}}, "
            "{name: babu, schedule: {kind: babu_then_head, body_rounds: 3}}, "
            "{name: prog, schedule: {kind: progressive, blocks: 2, every: 4}}, {name: plain}]",
            "training.lr=0.2",
        ],
    )
    lp, ncm, babu, prog, plain = (cfg.schedule_of(a) for a in cfg.arms)
    assert [r.policy for _, r in lp.stages] == [HeadOnly(), Full()] and lp.index_at(3) == 1
    assert ncm.recipe_at(1).uplink == Float32() and ncm.recipe_at(2).policy == Full()
    assert [rounds for rounds, _ in babu.stages] == [3, None]
    assert [rounds for rounds, _ in prog.stages] == [4, None]
    assert all(r.training.lr == 0.2 for s in (lp, ncm, babu, prog) for _, r in s.stages)
    assert not plain.staged and plain.recipe_at(1) == cfg.recipe(cfg.arms[4])


def test_experiment_config_reads_the_former_staged_policy_as_a_schedule() -> None:
    from fedtransfer.experiment.run import load_config

    staged = "{kind: stages, stages: [{rounds: 1, policy: {kind: head_only}}, {}]}"
    with pytest.warns(DeprecationWarning, match="schedule"):
        cfg = load_config(None, [f"policy={staged}"])
    schedule = cfg.schedule_of(cfg.arms[1])
    assert [r.policy for _, r in schedule.stages] == [HeadOnly(), Full()]
