"""Golden tests for client objectives on least-squares problems with closed-form optima."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedtransfer import LocalTraining, Recipe, ServerState, run_round
from fedtransfer.client.drift import Dyn, Nova, Scaffold
from fedtransfer.client.objectives import Objective, Plain, Prox
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.runtime import SerialRuntime
from fedtransfer.server import AllClients
from fedtransfer.transfer import Full

DIM, CLIENTS, PER_CLIENT = 3, 4, 16


def _linear() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Linear(DIM, 1, bias=False)


def _quadratic_population(seed: int = 0) -> FederatedDataset:
    """Clients whose inputs are scaled differently and whose targets come from different
    true weights: heterogeneous curvature and optima, so FedAvg with several local steps drifts."""
    gen = torch.Generator().manual_seed(seed)
    train, test = {}, {}
    for i in range(CLIENTS):
        scale = torch.tensor([1.0 + i, 1.0, 0.5 + 0.5 * i])
        x = torch.randn(PER_CLIENT, DIM, generator=gen) * scale
        w_true = torch.randn(DIM, generator=gen) * 2
        y = x @ w_true
        train[f"c{i}"] = TensorData(x, y)
        test[f"c{i}"] = TensorData(x[:2], y[:2])
    return FederatedDataset(train, test, num_classes=1)


def _optimum(pop: FederatedDataset) -> torch.Tensor:
    """argmin Σ_i mean_j (x_ij·w − y_ij)² with equal client sizes: (Σ XᵢᵀXᵢ)⁻¹ Σ Xᵢᵀyᵢ."""
    a = sum(pop.train[c].x.double().T @ pop.train[c].x.double() for c in pop.clients)
    b = sum(pop.train[c].x.double().T @ pop.train[c].y.double() for c in pop.clients)
    return torch.linalg.solve(a, b)


def _run(objective: Objective, rounds: int, *, lr: float = 0.01, steps: int = 10) -> torch.Tensor:
    pop = _quadratic_population()
    recipe = Recipe(
        policy=Full(),
        training=LocalTraining(lr=lr, steps=steps, batch_size=PER_CLIENT, loss="mse"),
        objective=objective,
        sampler=AllClients(),
    )
    state = ServerState.initial(recipe, _linear(), seed=0)
    for _ in range(rounds):
        state, _ = run_round(recipe, state, pop, SerialRuntime(), model_fn=_linear)
    return state.params["weight"].double().view(-1)


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts(single_thread: None) -> None:
    w_star = _optimum(_quadratic_population())
    fedavg = _run(Plain(), rounds=60, lr=0.02)
    scaffold = _run(Scaffold(), rounds=60, lr=0.02)
    assert float((scaffold - w_star).norm()) < 1e-5
    # FedAvg converges too, but to a fixed point biased by client drift
    assert float((fedavg - w_star).norm()) > 0.1


def test_feddyn_reaches_the_global_optimum(single_thread: None) -> None:
    w_star = _optimum(_quadratic_population())
    feddyn = _run(Dyn(alpha=1.0), rounds=200, lr=0.02)
    assert float((feddyn - w_star).norm()) < 1e-4


def _mean_gradient(w: torch.Tensor) -> torch.Tensor:
    pop = _quadratic_population()
    grads = []
    for c in pop.clients:
        x, y = pop.train[c].x.double(), pop.train[c].y.double()
        grads.append(2.0 / len(y) * x.T @ (x @ w - y))
    return torch.stack(grads).mean(dim=0)


@pytest.mark.parametrize("mu", [1e4, 1e5, 1e6])
def test_fedprox_with_very_large_mu_leaves_the_model_at_the_global(
    mu: float, single_thread: None
) -> None:
    """With lr = 1/μ each local step lands on w = θ − ∇L_i(w)/μ, so the round moves θ by
    −mean_i ∇L_i(θ)/μ + O(1/μ²): the model stays at the global as μ grows."""
    start = _linear().weight.detach().double().view(-1)
    prox = _run(Prox(mu=mu), rounds=1, lr=1.0 / mu, steps=20)
    expected = -_mean_gradient(start) / mu
    torch.testing.assert_close(prox - start, expected, rtol=2e-2, atol=1e-7)
    assert float((prox - start).norm()) < 20.0 / mu


def test_fedprox_with_zero_mu_is_fedavg(single_thread: None) -> None:
    plain = _run(Plain(), rounds=3)
    torch.testing.assert_close(_run(Prox(mu=0.0), rounds=3), plain)
    # the proximal term is live: with mu > 0 the same rounds end elsewhere, nearer the start
    # (a Prox that ignored mu would equal FedAvg here too)
    start = _linear().weight.detach().double().view(-1)
    prox = _run(Prox(mu=1.0), rounds=3)
    assert float((prox - plain).norm()) > 1e-3
    assert float((prox - start).norm()) < float((plain - start).norm())


def test_fednova_with_equal_local_steps_is_fedavg(single_thread: None) -> None:
    torch.testing.assert_close(
        _run(Nova(), rounds=3), _run(Plain(), rounds=3), rtol=1e-5, atol=1e-6
    )


def _unequal_population() -> FederatedDataset:
    pop = _quadratic_population()
    sizes = {"c0": 4, "c1": 8, "c2": 16, "c3": 16}
    train = {c: pop.train[c].subset(range(sizes[c])) for c in pop.clients}
    return FederatedDataset(train, pop.test, 1)


def test_fednova_step_is_tau_eff_times_the_weighted_normalised_updates(single_thread: None) -> None:
    """With batch 4 and one epoch, clients take 1, 2, 4, 4 steps: FedNova's global step is
    Σ p_i a_i · Σ p_i Δ_i / a_i, which we rebuild from FedAvg's per-client updates."""
    pop = _unequal_population()
    local = LocalTraining(lr=0.01, epochs=1, batch_size=4, loss="mse")
    start = _linear().weight.detach().clone()
    deltas, sizes = {}, {}
    for c in pop.clients:
        single = FederatedDataset({c: pop.train[c]}, {c: pop.test[c]}, 1)
        recipe = Recipe(policy=Full(), training=local, sampler=AllClients())
        state = ServerState.initial(recipe, _linear(), seed=0)
        new, _ = run_round(recipe, state, single, SerialRuntime(), model_fn=_linear)
        deltas[c] = new.params["weight"] - start
        sizes[c] = len(pop.train[c])
    steps = {c: -(-sizes[c] // 4) for c in pop.clients}
    total = sum(sizes.values())
    p = {c: sizes[c] / total for c in pop.clients}
    tau_eff = sum(p[c] * steps[c] for c in pop.clients)
    expected = start + tau_eff * sum(p[c] * deltas[c] / steps[c] for c in pop.clients)

    recipe = Recipe(policy=Full(), training=local, objective=Nova(), sampler=AllClients())
    state = ServerState.initial(recipe, _linear(), seed=0)
    # the clients' minibatch order depends on the client id, the same in both runs
    new, report = run_round(recipe, state, pop, SerialRuntime(), model_fn=_linear)
    torch.testing.assert_close(new.params["weight"], expected, rtol=1e-5, atol=1e-6)
    assert report.metrics["server/objective/tau_eff"] == pytest.approx(tau_eff)


@pytest.mark.parametrize("objective", [Scaffold(), Dyn(alpha=0.1)], ids=repr)
def test_objective_memory_survives_checkpoint_and_resume(
    objective: Objective, tmp_path: object, single_thread: None
) -> None:
    from fedtransfer.state import load_state, save_state

    pop = _quadratic_population()
    recipe = Recipe(
        policy=Full(),
        training=LocalTraining(lr=0.01, steps=3, batch_size=PER_CLIENT, loss="mse"),
        objective=objective,
        sampler=AllClients(),
    )
    model_fn: Callable[[], nn.Module] = _linear
    state = ServerState.initial(recipe, _linear(), seed=0)
    state, _ = run_round(recipe, state, pop, SerialRuntime(), model_fn=model_fn)
    assert set(state.holdings.memory) == set(pop.clients)
    save_state(state, tmp_path)  # type: ignore[arg-type]
    loaded = load_state(tmp_path)  # type: ignore[arg-type]
    a, _ = run_round(recipe, state, pop, SerialRuntime(), model_fn=model_fn)
    b, _ = run_round(recipe, loaded, pop, SerialRuntime(), model_fn=model_fn)
    assert torch.equal(a.params["weight"], b.params["weight"])
    for c in pop.clients:
        for k in a.holdings.memory[c]:
            assert torch.equal(a.holdings.memory[c][k], b.holdings.memory[c][k])
