"""Contract suite for client objectives: every registered objective, instantiated with defaults,
runs a deterministic round on TinyNet, keeps stable memory, sends extras the server accepts,
yields a complete personal model, validates with its recipe and round-trips through the config.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml
from tests.conftest import make_tiny_model

from fedtransfer import (
    CompatibilityError,
    LocalTraining,
    Recipe,
    RoundReport,
    ServerState,
    TransferPolicy,
    run_round,
)
from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.client.objectives import ClientContext, ClientOut, Objective
from fedtransfer.client.personalization import Rep
from fedtransfer.data import FederatedDataset
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment.registry import GROUPS
from fedtransfer.experiment.schema import ArmConfig, ExperimentConfig
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full, HeadOnly, PersonalHead

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS: dict[str, type] = GROUPS[Objective]


@pytest.fixture(params=sorted(KINDS), ids=sorted(KINDS))
def objective(request: pytest.FixtureRequest) -> Objective:
    made: Objective = KINDS[request.param]()
    return made


def _policy(objective: Objective) -> TransferPolicy:
    """FedRep trains a local head: it needs a policy that labels one; FedNCM sets the linear
    head (``body.1``, before the tiny model's BatchNorm) and shares nothing else."""
    if isinstance(objective, NearestClassMean):
        return HeadOnly("body.1")
    return PersonalHead() if isinstance(objective, Rep) else Full()


def _recipe(objective: Objective) -> Recipe:
    return Recipe(
        policy=_policy(objective),
        training=LocalTraining(lr=0.05, steps=2, batch_size=8),
        objective=objective,
        sampler=AllClients(),
    )


def _rounds(
    objective: Objective, data: FederatedDataset, n: int
) -> list[tuple[ServerState, RoundReport]]:
    recipe = _recipe(objective)
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    out = []
    for _ in range(n):
        state, report = run_round(recipe, state, data, SerialRuntime(), model_fn=make_tiny_model)
        out.append((state, report))
    return out


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _shared_key(name: str, shared: dict[str, torch.Tensor]) -> str | None:
    """``'c/body.1.weight'`` → ``'body.1.weight'`` when the suffix names a shared key."""
    _, _, rest = name.partition("/")
    return rest if rest in shared else None


def test_objective_is_an_objective(objective: Objective, tiny_data: FederatedDataset) -> None:
    """Both halves called directly, as a round calls them: ``check`` accepts its recipe's
    plan, ``train`` returns a :class:`ClientOut` whose extras are the ones ``extras_like``
    announces, and ``server_apply`` returns a step for every key of the aggregated step."""
    assert isinstance(objective, Objective)
    recipe = _recipe(objective)
    model = recipe.policy.prepare(make_tiny_model())
    plan = recipe.policy.plan(model)
    assert objective.check(plan) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shared = {k: v for k, v in before.items() if k in plan.shared}
    server = objective.server_init(shared, plan)
    ctx = ClientContext(
        global_shared=shared,
        memory={},
        broadcast=objective.broadcast(server),
        spec=recipe.training,
        generator=torch.Generator().manual_seed(0),
    )
    out = objective.train(model, plan, tiny_data.train["c0"], ctx)
    assert isinstance(out, ClientOut)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in out.metrics.items())
    after = model.state_dict()
    # the client contributes: it trains the model, or (FedNCM, which sets the head on the
    # server from class means) it sends statistics
    trained = any(not torch.equal(after[k], before[k]) for k in plan.trainable)
    assert trained or any(bool(v.abs().sum() > 0) for v in out.extras.values())
    expected = objective.extras_like(shared, plan)
    assert {k: v.shape for k, v in out.extras.items()} == {k: v.shape for k, v in expected.items()}
    update = {k: after[k] - before[k] for k in shared}
    step = objective.server_apply(
        dict(update),
        updates=[update],
        extras=[out.extras],
        weights=[1.0],
        state=server,
        population_size=len(tiny_data.clients),
        params=shared,
    )
    assert set(step.value) == set(update)


def test_objective_is_registered_under_its_own_kind(objective: Objective) -> None:
    (kind,) = [k for k, cls in KINDS.items() if cls is type(objective)]
    assert cfgio.dump(objective)["kind"] == kind


def test_objective_round_is_deterministic(
    objective: Objective, tiny_data: FederatedDataset
) -> None:
    (a, ra), (b, rb) = _rounds(objective, tiny_data, 1)[0], _rounds(objective, tiny_data, 1)[0]
    assert _same_tensors(a.params, b.params)
    assert _same_tensors(a.server, b.server)
    assert a.holdings.memory.keys() == b.holdings.memory.keys()
    for c in a.holdings.memory:
        assert _same_tensors(a.holdings.memory[c], b.holdings.memory[c]), c
    for c in a.holdings.local:
        assert _same_tensors(a.holdings.local[c], b.holdings.local[c]), c
    assert (ra.bytes_up, ra.bytes_down) == (rb.bytes_up, rb.bytes_down)


def test_objective_round_accepts_every_client(
    objective: Objective, tiny_data: FederatedDataset
) -> None:
    """The extras each client sends match ``extras_like``: no honest client is rejected."""
    ((state, report),) = _rounds(objective, tiny_data, 1)
    assert report.rejected == ()
    assert sorted(report.accepted) == sorted(tiny_data.clients)
    assert all(torch.isfinite(v).all() for v in state.params.values() if v.is_floating_point())


def test_objective_memory_keys_are_stable_across_rounds(
    objective: Objective, tiny_data: FederatedDataset
) -> None:
    (first, _), (second, _) = _rounds(objective, tiny_data, 2)
    assert first.holdings.memory.keys() == second.holdings.memory.keys()
    for c in first.holdings.memory:
        assert first.holdings.memory[c].keys() == second.holdings.memory[c].keys(), c
        for k, v in first.holdings.memory[c].items():
            assert second.holdings.memory[c][k].shape == v.shape, (c, k)


def test_objective_memory_tensors_are_shaped_like_shared_params(
    objective: Objective, tiny_data: FederatedDataset
) -> None:
    ((state, _),) = _rounds(objective, tiny_data, 1)
    for c, memory in state.holdings.memory.items():
        for name, value in memory.items():
            key = _shared_key(name, state.params)
            assert key is not None, f"{c}: memory {name!r} names no shared key"
            assert value.shape == state.params[key].shape, (c, name)


def test_objective_server_init_is_shaped_like_shared_params(objective: Objective) -> None:
    recipe = _recipe(objective)
    model = make_tiny_model()
    plan = recipe.plan(model)
    shared = {k: v for k, v in model.state_dict().items() if k in plan.shared}
    for name, value in objective.server_init(shared, plan).items():
        key = _shared_key(name, shared)
        assert key is not None, f"server state {name!r} names no shared key"
        assert value.shape == shared[key].shape, name
        assert value.dtype == shared[key].dtype, name


def test_objective_extras_like_is_shaped_like_shared_params(objective: Objective) -> None:
    """Per-key extras (``<name>/<shared key>``) mirror their parameter; extras without a prefix
    are statistics of their own shape (FedNova's scalar ``a``, FedNCM's class sums), and
    floating so that validation checks them for finiteness."""
    recipe = _recipe(objective)
    model = make_tiny_model()
    plan = recipe.plan(model)
    shared = {k: v for k, v in model.state_dict().items() if k in plan.shared}
    for name, value in objective.extras_like(shared, plan).items():
        if "/" not in name:
            assert value.dtype.is_floating_point and value.numel() >= 1, name
            continue
        key = _shared_key(name, shared)
        assert key is not None, f"extras {name!r} names no shared key"
        assert value.shape == shared[key].shape, name


def test_objective_server_state_keeps_its_keys_after_a_round(
    objective: Objective, tiny_data: FederatedDataset
) -> None:
    recipe = _recipe(objective)
    initial = ServerState.initial(recipe, make_tiny_model(), seed=0)
    ((after, _),) = _rounds(objective, tiny_data, 1)
    assert after.server.keys() == initial.server.keys()
    for k, v in initial.server.items():
        assert after.server[k].shape == v.shape, k


def test_objective_personal_returns_every_state_dict_key(
    objective: Objective, tiny_data: FederatedDataset
) -> None:
    ((state, _),) = _rounds(objective, tiny_data, 1)
    reference = make_tiny_model().state_dict()
    for c in tiny_data.clients:
        personal = objective.personal(state.weights_for(c), state.holdings.memory.get(c, {}))
        assert set(personal) == set(reference), c
        for k, v in reference.items():
            assert personal[k].shape == v.shape and personal[k].dtype == v.dtype, (c, k)
        make_tiny_model().load_state_dict(personal, strict=True)


def test_objective_personal_without_memory_is_the_held_model(objective: Objective) -> None:
    weights = make_tiny_model().state_dict()
    personal = objective.personal(weights, {})
    assert _same_tensors(dict(personal), dict(weights))


def test_objective_recipe_validates(objective: Objective) -> None:
    plan = _recipe(objective).validate(make_tiny_model(), population=["c0", "c1"])
    assert plan.shared


def test_objective_rep_with_full_policy_is_incompatible() -> None:
    recipe = Recipe(policy=Full(), objective=Rep(), sampler=AllClients())
    with pytest.raises(CompatibilityError, match="PersonalHead"):
        recipe.validate(make_tiny_model())


def test_objective_round_trips_through_config(objective: Objective) -> None:
    data = cfgio.dump(objective)
    assert cfgio.parse(Objective, data) == objective


def test_objective_round_trips_through_yaml_experiment_config(objective: Objective) -> None:
    cfg = ExperimentConfig(
        objective=objective,
        arms=(ArmConfig(name="a", init="scratch", objective=objective),),
    )
    back = cfgio.parse(ExperimentConfig, yaml.safe_load(cfgio.to_yaml(cfg)))
    assert back.objective == objective
    assert back.arms[0].objective == objective


def test_objective_pickles_to_an_equal_objective(objective: Objective) -> None:
    assert pickle.loads(pickle.dumps(objective)) == objective
