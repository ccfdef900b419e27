"""Objectives and personalisation policies inside ``run_round``: the byte ledger, malformed
extras, FedRep's head-then-body order, Ditto's personal model, FedBABU and LG-FedAvg plans,
and personalised fine-tuning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tests.conftest import make_tiny_model
from torch import Tensor

from fedtransfer import LocalTraining, Recipe, Reply, ServerState, run_round, tree
from fedtransfer.client.drift import Scaffold
from fedtransfer.client.objectives import Objective, Plain
from fedtransfer.client.personalization import Ditto, Personalization, Rep, personalize
from fedtransfer.client.train import local_train
from fedtransfer.codecs import Float32, Payload
from fedtransfer.data import FederatedDataset
from fedtransfer.runtime import SerialRuntime
from fedtransfer.seeding import generator
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full, PersonalHead, Rules
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import FrozenHead, GlobalHead

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD = ("head.weight", "head.bias")
VICTIM = "c2"
LINEAR_SHARED = Rules(rules=(("type:Linear", "shared"),), default="frozen")


PLAIN, FULL, LOCAL = Plain(), Full(), LocalTraining(lr=0.1, steps=2, batch_size=8)


def _recipe(
    objective: Objective = PLAIN, policy: TransferPolicy = FULL, local: LocalTraining = LOCAL
) -> Recipe:
    return Recipe(policy=policy, training=local, objective=objective, sampler=AllClients())


def _run(
    recipe: Recipe, data: FederatedDataset, rounds: int = 1, runtime: Any = None
) -> ServerState:
    state = ServerState.initial(recipe, make_tiny_model(), seed=0)
    for _ in range(rounds):
        state, _ = run_round(
            recipe, state, data, runtime or SerialRuntime(), model_fn=make_tiny_model
        )
    return state


def _trainable(state: dict[str, Tensor]) -> dict[str, Tensor]:
    names = {n for n, _ in make_tiny_model().named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def _distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return tree.global_norm(tree.sub(a, tree.select(b, a.keys())))


# --- the byte ledger ---------------------------------------------------------------------------


def test_round_scaffold_doubles_bytes_up_and_down() -> None:
    """Only parameters shared: SCAFFOLD's control variates mirror the update exactly."""
    from tests.conftest import make_tiny_data

    data = make_tiny_data()
    start = ServerState.initial(_recipe(policy=LINEAR_SHARED), make_tiny_model(), seed=0)
    _, plain = run_round(
        _recipe(policy=LINEAR_SHARED), start, data, SerialRuntime(), model_fn=make_tiny_model
    )
    recipe = _recipe(Scaffold(), LINEAR_SHARED)
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    _, scaffold = run_round(recipe, start, data, SerialRuntime(), model_fn=make_tiny_model)
    assert 1.9 <= scaffold.bytes_up / plain.bytes_up <= 2.1
    assert 1.9 <= scaffold.bytes_down / plain.bytes_down <= 2.1
    assert scaffold.setup_bytes == plain.setup_bytes


def test_round_scaffold_ledger_counts_extras_and_broadcast_exactly(
    tiny_data: FederatedDataset,
) -> None:
    """Full policy (buffers shared too): up = updates + encoded Δc, down = θ + encoded c."""
    recipe = _recipe(Scaffold())
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    plain_start = ServerState.initial(_recipe(), make_tiny_model(), seed=0)
    _, plain = run_round(
        _recipe(), plain_start, tiny_data, SerialRuntime(), model_fn=make_tiny_model
    )
    new, report = run_round(recipe, start, tiny_data, SerialRuntime(), model_fn=make_tiny_model)
    plan = recipe.plan(make_tiny_model())
    n = len(tiny_data.clients)
    extras = Float32().encode(Scaffold().extras_like(start.params, plan)).to_bytes()
    control = Float32().encode(Scaffold().server_init(start.params, plan)).to_bytes()
    assert report.bytes_up == plain.bytes_up + n * len(extras)
    assert report.bytes_down == plain.bytes_down + n * len(control)
    assert new.ledger["up"] == report.bytes_up and new.ledger["down"] == report.bytes_down


# --- malformed extras ----------------------------------------------------------------------------

Tamper = Callable[[Reply], Reply | None]


@dataclass(frozen=True)
class TamperingRuntime:
    """Runs client work serially, then lets ``tamper`` rewrite (or drop) the victim's result."""

    tamper: Tamper

    def map(self, fn: Callable[[Any], Reply], tasks: Sequence[Any]) -> list[Reply]:
        results = []
        for task in tasks:
            result = fn(task)
            if result.client == VICTIM:
                result = self.tamper(result)
            if result is not None:
                results.append(result)
        return results


def _extras(edit: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> Tamper:
    def tamper(result: Reply) -> Reply:
        extras = Float32().decode(Payload.from_bytes(result.extras)) if result.extras else {}
        return dataclasses.replace(result, extras=Float32().encode(edit(extras)).to_bytes())

    return tamper


def _renamed(extras: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.replace("dc/", "dx/"): v for k, v in extras.items()}


def _nan(extras: dict[str, Tensor]) -> dict[str, Tensor]:
    out = dict(extras)
    k = next(iter(out))
    out[k] = out[k].clone()
    out[k].view(-1)[0] = float("nan")
    return out


def _reshaped(extras: dict[str, Tensor]) -> dict[str, Tensor]:
    out = dict(extras)
    k = next(iter(out))
    out[k] = out[k].reshape(-1)[:-1]
    return out


def _missing(result: Reply) -> Reply:
    return dataclasses.replace(result, extras=b"")


def _garbled(result: Reply) -> Reply:
    return dataclasses.replace(result, extras=result.extras[: len(result.extras) // 2])


def _drop(result: Reply) -> None:
    return None


EXTRAS_CASES: dict[str, tuple[Tamper, str]] = {
    "wrong-keys": (_extras(_renamed), "lacks tensors"),
    "nan": (_extras(_nan), "non-finite"),
    "wrong-shape": (_extras(_reshaped), "shape"),
    "missing": (_missing, "missing"),
    "undecodable": (_garbled, "does not decode"),
}


@pytest.mark.parametrize("case", list(EXTRAS_CASES))
def test_round_rejects_malformed_scaffold_extras_naming_the_client(
    case: str, tiny_data: FederatedDataset
) -> None:
    tamper, reason = EXTRAS_CASES[case]
    recipe = _recipe(Scaffold())
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    new, report = run_round(
        recipe, start, tiny_data, TamperingRuntime(tamper), model_fn=make_tiny_model
    )
    assert [c for c, _ in report.rejected] == [VICTIM]
    assert VICTIM in report.rejected[0][1] and reason in report.rejected[0][1]
    assert VICTIM not in report.accepted and VICTIM not in new.holdings.memory


@pytest.mark.parametrize("case", list(EXTRAS_CASES))
def test_round_with_malformed_extras_equals_the_round_without_that_client(
    case: str, tiny_data: FederatedDataset
) -> None:
    tamper, _ = EXTRAS_CASES[case]
    recipe = _recipe(Scaffold())
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    tampered, _ = run_round(
        recipe, start, tiny_data, TamperingRuntime(tamper), model_fn=make_tiny_model
    )
    absent, _ = run_round(
        recipe, start, tiny_data, TamperingRuntime(_drop), model_fn=make_tiny_model
    )
    assert not tree.equal(tampered.params, start.params)
    assert tree.equal(tampered.params, absent.params)
    assert tree.equal(tampered.server, absent.server)


def test_round_rejects_extras_from_a_client_whose_objective_sends_none(
    tiny_data: FederatedDataset,
) -> None:
    def add(extras: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"dc/head.bias": torch.zeros(3)}

    recipe = _recipe(Plain())
    start = ServerState.initial(recipe, make_tiny_model(), seed=0)
    new, report = run_round(
        recipe, start, tiny_data, TamperingRuntime(_extras(add)), model_fn=make_tiny_model
    )
    absent, _ = run_round(
        recipe, start, tiny_data, TamperingRuntime(_drop), model_fn=make_tiny_model
    )
    assert [c for c, _ in report.rejected] == [VICTIM]
    assert "'dc/head.bias' is not one the receiver has" in report.rejected[0][1]
    assert tree.equal(new.params, absent.params)


# --- FedRep ------------------------------------------------------------------------------------


def test_round_fedrep_trains_the_head_with_the_body_fixed_then_the_body(
    tiny_data: FederatedDataset,
) -> None:
    """Replays one client's round by hand: ``head_epochs`` epochs of the head alone from the
    global body, then the recipe's steps of the body alone under the trained head, one
    minibatch generator throughout. Training in the other order gives a different head."""
    client = "c1"
    one = FederatedDataset(
        {client: tiny_data.train[client]}, {client: tiny_data.test[client]}, tiny_data.num_classes
    )
    recipe = _recipe(Rep(head_epochs=2), PersonalHead())
    state = _run(recipe, one)

    model = make_tiny_model()
    plan = recipe.plan(model)
    gen = generator(0, "batches", 1, client)
    head_spec = dataclasses.replace(recipe.training, epochs=2, steps=None)
    local_train(model, plan.only(plan.local), one.train[client], head_spec, generator=gen)
    assert tree.equal(state.holdings.local[client], tree.select(model.state_dict(), plan.local))
    local_train(model, plan.only(plan.shared), one.train[client], recipe.training, generator=gen)
    expected = tree.select(model.state_dict(), plan.shared)
    for k in expected:
        torch.testing.assert_close(state.params[k], expected[k], rtol=1e-6, atol=1e-7)


def test_round_fedrep_shares_the_body_and_keeps_a_distinct_head_per_client(
    tiny_data: FederatedDataset,
) -> None:
    recipe = _recipe(Rep(head_epochs=1), PersonalHead())
    start = make_tiny_model().state_dict()
    state = _run(recipe, tiny_data)
    assert set(state.params) == set(start) - set(HEAD)
    assert not tree.equal(state.params, tree.select(start, state.params))
    heads = [state.holdings.local[c] for c in tiny_data.clients]
    assert all(set(h) == set(HEAD) for h in heads)
    assert all(not tree.equal(h, tree.select(start, HEAD)) for h in heads)
    assert not tree.equal(heads[0], heads[1])


# --- Ditto -------------------------------------------------------------------------------------


def test_round_ditto_memory_holds_a_personal_copy_of_every_shared_key(
    tiny_data: FederatedDataset,
) -> None:
    recipe = _recipe(Ditto(lam=0.1), PersonalHead())
    state = _run(recipe, tiny_data)
    plan = recipe.plan(make_tiny_model())
    for c in tiny_data.clients:
        assert set(state.holdings.memory[c]) == {f"v/{k}" for k in plan.shared}, c
        for k in plan.shared:
            assert state.holdings.memory[c][f"v/{k}"].shape == state.params[k].shape
        personal = _trainable(
            {k.removeprefix("v/"): v for k, v in state.holdings.memory[c].items()}
        )
        assert not tree.equal(personal, tree.select(state.params, personal)), c


def test_round_ditto_personal_substitutes_the_personal_copy(tiny_data: FederatedDataset) -> None:
    recipe = _recipe(Ditto(lam=0.1), PersonalHead())
    state = _run(recipe, tiny_data)
    plan = recipe.plan(make_tiny_model())
    for c in tiny_data.clients:
        held = state.weights_for(c)
        personal = recipe.objective.personal(held, state.holdings.memory[c])
        assert set(personal) == set(held)
        for k in plan.shared:
            assert torch.equal(personal[k], state.holdings.memory[c][f"v/{k}"]), (c, k)
        for k in plan.local:
            assert torch.equal(personal[k], held[k]), (c, k)


def test_round_ditto_personal_model_starts_the_next_round_from_memory(
    tiny_data: FederatedDataset,
) -> None:
    """Round 2 continues each personal model: forgetting it (empty memory) changes the result."""
    recipe = _recipe(Ditto(lam=0.1))
    first = _run(recipe, tiny_data)
    second, _ = run_round(recipe, first, tiny_data, SerialRuntime(), model_fn=make_tiny_model)
    forgot, _ = run_round(
        recipe,
        first.replace(holdings=dataclasses.replace(first.holdings, memory={})),
        tiny_data,
        SerialRuntime(),
        model_fn=make_tiny_model,
    )
    assert tree.equal(second.params, forgot.params)  # the global copy does not depend on v
    assert not tree.equal(second.holdings.memory["c0"], forgot.holdings.memory["c0"])


def test_round_ditto_with_huge_lam_keeps_the_personal_model_near_the_global(
    tiny_data: FederatedDataset,
) -> None:
    """With lr = 1/λ each personal step lands on θ − ∇L(v)/λ, so v stays within one small step
    of θ; without the term, 20 steps carry it much further."""
    local = LocalTraining(lr=1e-3, steps=1, batch_size=8)
    start = _trainable(make_tiny_model().state_dict())

    def personal_distance(lam: float) -> float:
        state = _run(_recipe(Ditto(lam=lam, steps=20), Full(), local), tiny_data)
        v = {k.removeprefix("v/"): t for k, t in state.holdings.memory["c0"].items()}
        return _distance(start, v)

    near, free = personal_distance(1e3), personal_distance(0.0)
    assert free > 0
    assert near < 0.2 * free


# --- FedBABU and LG-FedAvg ---------------------------------------------------------------------


def test_round_frozen_head_keeps_the_head_at_its_start_across_rounds(
    tiny_data: FederatedDataset,
) -> None:
    recipe = _recipe(policy=FrozenHead())
    start = make_tiny_model().state_dict()
    state = _run(recipe, tiny_data, rounds=3)
    assert not set(HEAD) & set(state.params)
    for c in (None, *tiny_data.clients):
        weights = state.weights_for(c)
        for k in HEAD:
            assert torch.equal(weights[k], start[k]), (c, k)
    assert not tree.equal(state.params, tree.select(start, state.params))


def test_round_frozen_head_sends_only_body_bytes(tiny_data: FederatedDataset) -> None:
    state = _run(_recipe(policy=FrozenHead()), tiny_data)
    start = make_tiny_model().state_dict()
    body = Float32().encode(tree.select(start, [k for k in start if k not in HEAD])).to_bytes()
    assert state.ledger["up"] == len(tiny_data.clients) * len(body)
    assert state.ledger["down"] == len(tiny_data.clients) * len(body)


def test_round_global_head_shares_only_the_head(tiny_data: FederatedDataset) -> None:
    recipe = _recipe(policy=GlobalHead())
    start = make_tiny_model().state_dict()
    state = _run(recipe, tiny_data, rounds=2)
    assert set(state.params) == set(HEAD)
    assert not tree.equal(state.params, tree.select(start, HEAD))
    body = set(start) - set(HEAD)
    for c in tiny_data.clients:
        assert set(state.holdings.local[c]) == body, c
        assert not tree.equal(state.holdings.local[c], tree.select(start, body)), c
    assert not tree.equal(state.holdings.local["c0"], state.holdings.local["c1"])


def test_round_global_head_sends_only_head_bytes(tiny_data: FederatedDataset) -> None:
    state = _run(_recipe(policy=GlobalHead()), tiny_data)
    head = Float32().encode(tree.select(make_tiny_model().state_dict(), HEAD)).to_bytes()
    assert state.ledger["up"] == len(tiny_data.clients) * len(head)
    assert state.ledger["down"] == len(tiny_data.clients) * len(head)


# --- personalised fine-tuning ------------------------------------------------------------------


def test_personalize_with_zero_steps_leaves_the_weights_unchanged(
    tiny_data: FederatedDataset,
) -> None:
    weights = tree.clone(make_tiny_model(seed=3).state_dict())
    model = personalize(
        make_tiny_model(),
        weights,
        tiny_data.train["c0"],
        Personalization(steps=0),
        generator=generator(0, "personalize", "c0"),
    )
    assert tree.equal(model.state_dict(), weights)


def test_personalize_head_changes_only_head_keys(tiny_data: FederatedDataset) -> None:
    weights = tree.clone(make_tiny_model(seed=3).state_dict())
    model = personalize(
        make_tiny_model(),
        weights,
        tiny_data.train["c0"],
        Personalization(steps=3, lr=0.1, finetune="head"),
        generator=generator(0, "personalize", "c0"),
    )
    after = model.state_dict()
    for k in weights:
        assert torch.equal(after[k], weights[k]) == (k not in HEAD), k


def test_personalize_everything_changes_the_body_too(tiny_data: FederatedDataset) -> None:
    weights = tree.clone(make_tiny_model(seed=3).state_dict())
    model = personalize(
        make_tiny_model(),
        weights,
        tiny_data.train["c0"],
        Personalization(steps=3, lr=0.1, finetune="*"),
        generator=generator(0, "personalize", "c0"),
    )
    after = model.state_dict()
    assert not torch.equal(after["body.1.weight"], weights["body.1.weight"])
    assert not torch.equal(after["head.weight"], weights["head.weight"])


def test_personalize_does_not_mutate_the_given_weights(tiny_data: FederatedDataset) -> None:
    weights = tree.clone(make_tiny_model(seed=3).state_dict())
    before = tree.clone(weights)
    personalize(
        make_tiny_model(),
        weights,
        tiny_data.train["c0"],
        Personalization(steps=3, lr=0.1),
        generator=generator(0, "personalize", "c0"),
    )
    assert tree.equal(weights, before)
