"""Our FedAvg / FedAvgM / FedAdam / FedYogi / FedAdagrad server steps against Flower's (flwr 1.42).

Flower side: the current Message-API strategies ``flwr.serverapp.strategy.{FedAvg, FedAvgM,
FedAdam, FedYogi, FedAdagrad}``, run by their own ``Strategy.start`` loop (so Flower numbers the
rounds from 1 and carries its own momentum / m / v). The loop talks to ``_ReplayGrid``, an
in-process ``flwr.serverapp.Grid`` whose node ``i`` answers round ``r``'s train message with the
arrays ``θ_r + Δ_{r,i}`` (``θ_r`` read from that message) and ``num-examples = n_i``. Building
messages needs a task identity, which the fixture sets as Flower's ServerApp runtime does. A
smaller sample also drives the legacy ``flwr.server.strategy`` classes through ``aggregate_fit``
with hand-built ``FitRes`` (their ``ClientProxy`` slot is never read, so it holds ``None``).

Our side: ``ServerPipeline(aggregator=Mean(), post=(X,))`` applied to the same ``Δ_{r,i}`` with
weights ``n_i`` gives the step ``s_r``, and ``θ_{r+1} = θ_r + s_r``. Flower's ``eta`` is our
``lr``, ``beta_1``/``beta_2`` our ``beta1``/``beta2``; ``tau`` is ``tau`` in both:

==============================================  ==================================================
Flower                                          ours
==============================================  ==================================================
``FedAvg()``                                    ``ServerSGD()``
``FedAvgM(server_learning_rate, server_mom.)``  ``ServerSGD(lr, momentum)``
``FedAdam(eta, beta_1, beta_2, tau)``           ``ServerAdam(..., bias_correction="flower")``
``FedYogi(eta, beta_1, beta_2, tau)``           ``ServerYogi(lr, beta1, beta2, tau)``
``FedAdagrad(eta, tau)``                        ``ServerAdagrad(lr, beta1=0.0, tau=tau)``
==============================================  ==================================================

Differences, each pinned by a test below:

* FedAdam: Flower multiplies ``eta`` by ``√(1−β₂ᵏ)/(1−β₁ᵏ)`` with ``k = server_round + 1``
  (so k = 2 in round 1); our default follows Reddi et al. Algorithm 2 with no correction, so our
  step is Flower's divided by that factor, and ``bias_correction="adam"`` (k = t) is Flower's
  times the ratio of the two factors.
* FedAdagrad: Flower fixes ``beta_1 = 0`` (no first-moment averaging); ours defaults to 0.9 and
  equals Flower once Flower's ``beta_1`` attribute is set to ours.
* FedAvgM: Flower's momentum accumulates the pseudo-gradient ``θ − mean_i w_i = −Δ`` and steps
  ``θ − lr·v``; ours accumulates ``Δ`` and steps ``θ + lr·v``: the same θ', and Flower's
  momentum vector is minus our state ``v``. (Flower's first round sets ``v = −Δ``; ours
  computes ``momentum · 0 + Δ``: the same.)
* ``eta_l`` (client learning rate) is stored by Flower but never read when aggregating.
* Our ``initial_accumulator`` (v₀) has no Flower argument; it equals Flower with ``v_t`` seeded.
* Defaults differ (Flower's ``eta`` 0.1 or 0.01, ``tau`` 1e-3, or 1e-9 in the legacy classes;
  ours ``lr`` 0.01, ``tau`` 1e-3), and Flower accepts settings we reject (momentum ≥ 1, lr ≤ 0;
  negative momentum it ignores): every comparison passes all settings explicitly.

Inputs are float32 values (so both sides see the same numbers); Flower computes in float64.
Ours is compared with the same Flower run twice: on float64 tensors (the same code; this is
the semantic check, max |difference| ≤ 1e-6 and in practice ≤ 1e-14) and on float32, the
training dtype, which holds θ only to ~6e-8·|θ| (θ random-walks to |θ| ≈ 10 in five FedAvg
rounds), so there the tolerance is 1e-6 · max(1, |θ|). Settings keep steps sensible: updates
N(0, 1), FedAvgM lr ≤ 1 and momentum ≤ 0.9, adaptive lr ≤ 0.1 and τ ≥ 1e-2.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, NoReturn

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as legacy
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

from fedtransfer import tree
from fedtransfer.server import (
    Mean,
    ServerAdagrad,
    ServerAdam,
    ServerPipeline,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)

pytestmark = pytest.mark.usefixtures("single_thread", "flower_server_identity")

TOL = 1e-6
NUM_CASES = 200
NUM_LEGACY_CASES = 40
NUM_DIFFERENCE_CASES = 30
ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def flower_server_identity() -> Iterator[None]:
    """Identify the process as a ServerApp (as ``flwr``'s runtime does); quiet Flower's log.

    Flower's node sampling draws from the global ``random``; its state is restored afterwards.
    """
    logger = logging.getLogger("flwr")
    level, random_state = logger.level, random.getstate()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIdentity, "_task_id", 1)
        patch.setattr(TaskIdentity, "_run_id", 1)
        patch.setattr(TaskIdentity, "_node_id", 1)  # flwr.common.constant.SUPERLINK_NODE_ID
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
            random.setstate(random_state)


# --- random cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Initial parameters, per-round per-client updates, example counts and our settings."""

    algorithm: str
    seed: int
    theta0: Arrays
    updates: list[list[Arrays]]  # [round][client]
    counts: list[int]
    hp: dict[str, float]  # our names: lr, momentum, beta1, beta2, tau


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(math.log(low), math.log(high))))


def _settings(algorithm: str, rng: np.random.Generator) -> dict[str, float]:
    if algorithm == "fedavg":
        return {}
    if algorithm == "fedavgm":  # lr 1 with momentum 0 is Flower's "server_opt off" branch
        lr = 1.0 if rng.random() < 0.2 else float(rng.uniform(0.05, 1.0))
        momentum = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.0, 0.9))
        return {"lr": lr, "momentum": momentum}
    hp = {"lr": _log_uniform(rng, 1e-3, 0.1), "tau": _log_uniform(rng, 1e-2, 1.0)}
    if algorithm != "fedadagrad":
        hp |= {"beta1": float(rng.uniform(0.0, 0.99)), "beta2": float(rng.uniform(0.0, 0.999))}
    return hp


@functools.cache
def _case(algorithm: str, seed: int) -> Case:
    """1–12 clients, 1–4 tensors of 0–3 dimensions, 2–5 rounds, counts in [0, 500)."""
    rng = np.random.default_rng([ALGORITHMS.index(algorithm), seed])
    num_clients, num_rounds = int(rng.integers(1, 13)), int(rng.integers(2, 6))
    shapes = {
        f"layer{j}.weight": tuple(int(d) for d in rng.integers(1, 6, size=rng.integers(0, 4)))
        for j in range(int(rng.integers(1, 5)))
    }

    def draw() -> Arrays:
        return {
            k: rng.standard_normal(s).astype(np.float32).astype(np.float64)
            for k, s in shapes.items()
        }

    counts = rng.integers(0, 500, size=num_clients)
    counts[rng.integers(num_clients)] += 1  # the total is positive; zero-count clients stay
    return Case(
        algorithm=algorithm,
        seed=seed,
        theta0=draw(),
        updates=[[draw() for _ in range(num_clients)] for _ in range(num_rounds)],
        counts=[int(c) for c in counts],
        hp=_settings(algorithm, rng),
    )


# --- our side ---------------------------------------------------------------------------------


def _ours_for(case: Case, *, adam_correction: str = "flower", adagrad_beta1: float = 0.0) -> Any:
    hp = case.hp
    if case.algorithm == "fedavg":
        return ServerSGD()
    if case.algorithm == "fedavgm":
        return ServerSGD(lr=hp["lr"], momentum=hp["momentum"])
    if case.algorithm == "fedadagrad":
        return ServerAdagrad(lr=hp["lr"], beta1=adagrad_beta1, tau=hp["tau"])
    moments = {"lr": hp["lr"], "beta1": hp["beta1"], "beta2": hp["beta2"], "tau": hp["tau"]}
    if case.algorithm == "fedyogi":
        return ServerYogi(**moments)
    return ServerAdam(**moments, bias_correction=adam_correction)


@dataclass(frozen=True)
class Run:
    """θ after each round, the step of each round and the final state."""

    thetas: list[Arrays]
    steps: list[Arrays]
    state: dict[str, torch.Tensor]


def _run_ours(case: Case, transform: UpdateTransform, dtype: torch.dtype) -> Run:
    pipe = ServerPipeline(aggregator=Mean(), post=(transform,))

    def tensors(a: Arrays) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=dtype) for k, v in a.items()}

    def arrays(t: dict[str, torch.Tensor]) -> Arrays:
        return {k: v.double().numpy() for k, v in t.items()}

    theta = tensors(case.theta0)
    state = pipe.init(theta)
    thetas, steps = [], []
    for updates in case.updates:
        out = pipe.apply([tensors(u) for u in updates], case.counts, params=theta, state=state)
        theta, state = tree.add(theta, out.value), out.state
        thetas.append(arrays(theta))
        steps.append(arrays(out.value))
    return Run(thetas, steps, state)


# --- Flower's side ----------------------------------------------------------------------------


def _flower_for(case: Case, *, eta_l: float = 0.1) -> Any:
    """Flower's Message-API strategy with our settings, sampling every client each round."""
    hp, n = case.hp, len(case.counts)
    nodes: dict[str, Any] = {"min_train_nodes": n, "min_available_nodes": n}
    nodes["fraction_evaluate"] = 0.0
    if case.algorithm == "fedavg":
        return flower.FedAvg(**nodes)
    if case.algorithm == "fedavgm":
        return flower.FedAvgM(
            **nodes, server_learning_rate=hp["lr"], server_momentum=hp["momentum"]
        )
    if case.algorithm == "fedadagrad":
        return flower.FedAdagrad(**nodes, eta=hp["lr"], eta_l=eta_l, tau=hp["tau"])
    cls = flower.FedAdam if case.algorithm == "fedadam" else flower.FedYogi
    return cls(
        **nodes, eta=hp["lr"], eta_l=eta_l, beta_1=hp["beta1"], beta_2=hp["beta2"], tau=hp["tau"]
    )


class _ReplayGrid(Grid):
    """In-process Grid: node ``i`` replies to round ``r`` with ``θ_r + Δ_{r,i}`` and ``n_i``."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.received: list[Arrays] = []  # θ_r as each round's train messages carry it

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = list(messages)
        if not sent:  # evaluation rounds (fraction_evaluate=0.0)
            return []
        updates = self.case.updates[len(self.received)]
        decoded: dict[int, Arrays] = {}  # the strategy sends one RecordDict to every node
        replies = []
        for msg in sent:
            theta = decoded.get(id(msg.content))
            if theta is None:
                theta = {k: a.numpy() for k, a in msg.content["arrays"].items()}
                decoded[id(msg.content)] = theta
            node = msg.metadata.dst_node_id
            replies.append(self._reply(msg, theta, updates[node], self.case.counts[node]))
        assert len(decoded) == 1
        self.received.append(theta)
        return replies

    @staticmethod
    def _reply(msg: Message, theta: Arrays, update: Arrays, count: int) -> Message:
        weights = ArrayRecord({k: Array(np.asarray(theta[k] + update[k])) for k in theta})
        content = RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": count})})
        return Message(content, reply_to=msg)

    def get_node_ids(self) -> list[int]:
        return list(range(len(self.case.counts)))

    def _unused(self, *args: object, **kwargs: object) -> NoReturn:
        raise NotImplementedError("strategy.start only calls send_and_receive and get_node_ids")

    set_run = create_message = push_messages = pull_messages = _unused
    run = property(_unused)


def _run_flower(case: Case, strategy: Any) -> list[Arrays]:
    """θ after each round, as Flower's own ``start`` loop computes it."""
    grid = _ReplayGrid(case)
    initial = ArrayRecord({k: Array(v.copy()) for k, v in case.theta0.items()})
    result = strategy.start(grid, initial, num_rounds=len(case.updates))
    return [*grid.received[1:], {k: a.numpy() for k, a in result.arrays.items()}]


@functools.cache
def _flower_reference(algorithm: str, seed: int) -> tuple[list[Arrays], Any]:
    """Flower's θ after each round for a case with our settings, and the strategy it ran."""
    case = _case(algorithm, seed)
    strategy = _flower_for(case)
    return _run_flower(case, strategy), strategy


def _legacy_for(case: Case) -> Any:
    hp, initial = case.hp, ndarrays_to_parameters(list(case.theta0.values()))
    if case.algorithm == "fedavg":
        return legacy.FedAvg(initial_parameters=initial)
    if case.algorithm == "fedavgm":
        return legacy.FedAvgM(
            initial_parameters=initial,
            server_learning_rate=hp["lr"],
            server_momentum=hp["momentum"],
        )
    if case.algorithm == "fedadagrad":
        return legacy.FedAdagrad(initial_parameters=initial, eta=hp["lr"], tau=hp["tau"])
    cls = legacy.FedAdam if case.algorithm == "fedadam" else legacy.FedYogi
    return cls(
        initial_parameters=initial,
        eta=hp["lr"],
        beta_1=hp["beta1"],
        beta_2=hp["beta2"],
        tau=hp["tau"],
    )


def _run_legacy(case: Case, strategy: Any) -> list[Arrays]:
    """θ after each round from the legacy ``aggregate_fit``, rounds numbered from 1."""
    keys, theta = list(case.theta0), list(case.theta0.values())
    thetas = []
    for server_round, updates in enumerate(case.updates, start=1):
        results = [
            (
                None,  # the ClientProxy: aggregate_fit never reads it
                FitRes(
                    Status(Code.OK, ""),
                    ndarrays_to_parameters([t + u[k] for k, t in zip(keys, theta, strict=True)]),
                    count,
                    {},
                ),
            )
            for u, count in zip(updates, case.counts, strict=True)
        ]
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        theta = parameters_to_ndarrays(parameters)
        thetas.append(dict(zip(keys, theta, strict=True)))
    return thetas


# --- comparison -------------------------------------------------------------------------------


def _diff(a: Sequence[Arrays], b: Sequence[Arrays], *, relative: bool = False) -> float:
    """max |a − b| over rounds and elements; with ``relative``, over ``max(1, |b|)``."""
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].shape == y[k].shape, k
            gap = np.abs(x[k] - y[k]) / (np.maximum(1.0, np.abs(y[k])) if relative else 1.0)
            worst = max(worst, float(np.max(gap, initial=0.0)))
    return worst


def _worst(diffs: dict[int, float]) -> str:
    seed = max(diffs, key=lambda s: diffs[s])
    return f"max |ours − Flower| = {diffs[seed]:.3g} at seed {seed}"


def _cases(algorithm: str, num: int = NUM_CASES) -> list[Case]:
    return [_case(algorithm, seed) for seed in range(num)]


def test_random_cases_vary_clients_tensors_rounds_and_counts() -> None:
    cases = [c for a in ALGORITHMS for c in _cases(a)]
    assert {len(c.counts) for c in cases} == set(range(1, 13))
    assert {len(c.theta0) for c in cases} == {1, 2, 3, 4}
    assert {v.ndim for c in cases for v in c.theta0.values()} == {0, 1, 2, 3}
    assert {len(c.updates) for c in cases} == {2, 3, 4, 5}
    assert any(0 in c.counts and len(c.counts) > 1 for c in cases)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flower_strategy_matches_our_pipeline_in_float64(algorithm: str) -> None:
    diffs = {
        c.seed: _diff(
            _run_ours(c, _ours_for(c), torch.float64).thetas,
            _flower_reference(algorithm, c.seed)[0],
        )
        for c in _cases(algorithm)
    }
    assert max(diffs.values()) <= TOL, _worst(diffs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flower_strategy_matches_our_pipeline_in_float32(algorithm: str) -> None:
    """Float32 holds θ to ~6e-8·|θ|, so the tolerance is 1e-6 · max(1, |θ|)."""
    diffs = {
        c.seed: _diff(
            _run_ours(c, _ours_for(c), torch.float32).thetas,
            _flower_reference(algorithm, c.seed)[0],
            relative=True,
        )
        for c in _cases(algorithm)
    }
    assert max(diffs.values()) <= TOL, _worst(diffs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_legacy_flower_strategy_matches_our_pipeline(algorithm: str) -> None:
    diffs = {
        c.seed: _diff(
            _run_ours(c, _ours_for(c), torch.float64).thetas, _run_legacy(c, _legacy_for(c))
        )
        for c in _cases(algorithm, NUM_LEGACY_CASES)
    }
    assert max(diffs.values()) <= TOL, _worst(diffs)


def _flower_factor(case: Case, k: int) -> float:
    """Flower's ``eta_norm / eta`` = √(1−β₂ᵏ)/(1−β₁ᵏ), which it evaluates at k = round + 1."""
    b1, b2 = case.hp["beta1"], case.hp["beta2"]
    return math.sqrt(1.0 - b2**k) / (1.0 - b1**k)


def _steps(theta0: Arrays, thetas: list[Arrays]) -> list[Arrays]:
    return [{k: b[k] - a[k] for k in a} for a, b in pairwise([theta0, *thetas])]


@pytest.mark.parametrize(
    ("correction", "exponent_offset"),
    [("none", None), ("adam", 0)],
    ids=["uncorrected-default", "adam-corrected"],
)
def test_fedadam_step_is_flowers_over_the_ratio_of_bias_corrections(
    correction: str, exponent_offset: int | None
) -> None:
    """Our round-t step × Flower's factor at k = t + 1 ÷ ours (1, or k = t) is Flower's step."""
    diffs, largest_gap = {}, 0.0
    for case in _cases("fedadam", NUM_DIFFERENCE_CASES):
        ours = _run_ours(case, _ours_for(case, adam_correction=correction), torch.float64)
        theirs = _steps(case.theta0, _flower_reference("fedadam", case.seed)[0])
        rescaled = []
        for t, step in enumerate(ours.steps, start=1):
            own = 1.0 if exponent_offset is None else _flower_factor(case, t + exponent_offset)
            scale = _flower_factor(case, t + 1) / own
            rescaled.append({k: scale * v for k, v in step.items()})
        diffs[case.seed] = _diff(rescaled, theirs)
        largest_gap = max(largest_gap, _diff(ours.steps, theirs))
    assert max(diffs.values()) <= 1e-9, _worst(diffs)
    assert largest_gap > 1e-3  # without the rescaling the two really differ


def test_fedadam_bias_correction_counts_rounds_in_state() -> None:
    case = _case("fedadam", 0)
    plain = _run_ours(case, _ours_for(case, adam_correction="none"), torch.float64).state
    assert "post/0/t" not in plain
    state = _run_ours(case, _ours_for(case), torch.float64).state
    assert state["post/0/t"].dtype == torch.int64
    assert int(state["post/0/t"]) == len(case.updates)


def test_fedadagrad_beta1_is_the_only_difference_from_flower() -> None:
    """Flower's FedAdagrad pins ``beta_1 = 0``; ours defaults to 0.9 (Reddi et al.)."""
    assert flower.FedAdagrad().beta_1 == 0.0
    assert ServerAdagrad().beta1 == 0.9
    diffs, largest_gap = {}, 0.0
    for case in _cases("fedadagrad", NUM_DIFFERENCE_CASES):
        beta1 = float(np.random.default_rng(case.seed).uniform(0.1, 0.99))
        ours = _run_ours(case, _ours_for(case, adagrad_beta1=beta1), torch.float64).thetas
        patched = _flower_for(case)
        patched.beta_1 = beta1  # read by FedOpt._compute_deltat_and_mt every round
        diffs[case.seed] = _diff(ours, _run_flower(case, patched))
        largest_gap = max(largest_gap, _diff(ours, _flower_reference("fedadagrad", case.seed)[0]))
    assert max(diffs.values()) <= TOL, _worst(diffs)
    assert largest_gap > 1e-3


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_state_equals_flowers_moments(algorithm: str) -> None:
    for case in _cases(algorithm, NUM_DIFFERENCE_CASES):
        state = _run_ours(case, _ours_for(case), torch.float64).state
        strategy = _flower_reference(algorithm, case.seed)[1]
        for k in case.theta0:
            np.testing.assert_allclose(state[f"post/0/m/{k}"].numpy(), strategy.m_t[k], atol=1e-12)
            np.testing.assert_allclose(state[f"post/0/v/{k}"].numpy(), strategy.v_t[k], atol=1e-12)


def test_fedavgm_momentum_is_minus_flowers_pseudo_gradient_momentum() -> None:
    """Same θ' (tested above); Flower's momentum is on ``−Δ``, so its vector is ``−v``."""
    checked = 0
    for case in _cases("fedavgm", NUM_DIFFERENCE_CASES):
        if case.hp["momentum"] == 0.0:
            continue
        state = _run_ours(case, _ours_for(case), torch.float64).state
        strategy = _flower_reference("fedavgm", case.seed)[1]
        for k, theirs in zip(case.theta0, strategy.momentum_vector, strict=True):
            np.testing.assert_allclose(-state[f"post/0/v/{k}"].numpy(), theirs, atol=1e-12)
        checked += 1
    assert checked >= NUM_DIFFERENCE_CASES // 2


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi", "fedadagrad"])
def test_initial_accumulator_equals_flower_with_seeded_second_moment(algorithm: str) -> None:
    """Flower has no v₀ argument; ``v_t`` set before round 1 is used as is (it is non-empty)."""
    diffs = {}
    for case in _cases(algorithm, NUM_DIFFERENCE_CASES):
        v0 = float(np.random.default_rng(case.seed).uniform(0.01, 2.0))
        ours = _run_ours(case, replace(_ours_for(case), initial_accumulator=v0), torch.float64)
        strategy = _flower_for(case)
        strategy.v_t = {k: np.full_like(v, v0) for k, v in case.theta0.items()}
        diffs[case.seed] = _diff(ours.thetas, _run_flower(case, strategy))
    assert max(diffs.values()) <= TOL, _worst(diffs)


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi", "fedadagrad"])
def test_flower_client_learning_rate_does_not_enter_aggregation(algorithm: str) -> None:
    for case in _cases(algorithm, 5):
        runs = []
        for eta_l in (1e-4, 10.0):
            random.seed(case.seed)  # Flower's node order, hence its summation order
            runs.append(_run_flower(case, _flower_for(case, eta_l=eta_l)))
        assert _diff(*runs) == 0.0
