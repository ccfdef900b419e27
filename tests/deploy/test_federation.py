"""The transport-free deployment round equals the simulator: same seeds, cohorts, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtransfer import tree
from fedtransfer.deploy.federation import Holdings, client_round, deployed_round
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.experiment.run import build_population, load_config, run_experiment, start_state
from fedtransfer.rounds.messages import NEEDS_SETUP, Reply, Request
from fedtransfer.state import load_state

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = [
    "rounds=3",
    "data.num_clients=4",
    "sampler.clients_per_round=3",
    "pretrain.training.epochs=1",
    "personalization=null",
]


def _config(extra: list[str], arm: str):  # type: ignore[no-untyped-def]
    cfg = load_config(Path(__file__).parents[2] / "configs" / "default.yaml", SMALL + extra)
    from dataclasses import replace

    return replace(cfg, arms=tuple(a for a in cfg.arms if a.name == arm))


def _deployed(cfg, root: Path, arm: str):  # type: ignore[no-untyped-def]
    _, recipe, state = start_state(cfg, root, arm)
    population = build_population(cfg)
    held: dict[str, Holdings] = {c: Holdings() for c in population.clients}
    asked: list[list[str]] = []

    def send(requests: list[Request]) -> dict[str, Reply]:
        asked.append([r.client for r in requests])
        replies = {}
        for req in requests:
            reply, held[req.client] = client_round(
                req, held[req.client], population.train[req.client], recipe, model_fn=cfg.model
            )
            replies[req.client] = reply
        return replies

    reports = []
    while state.round < cfg.rounds:
        state, rep = deployed_round(recipe, state, population.clients, send, model_fn=cfg.model)
        reports.append(rep)
    return state, reports, asked, held


@pytest.mark.parametrize(
    ("extra", "arm"),
    [
        ([], "pretrained-full"),
        (["objective={kind: scaffold}"], "pretrained-full"),
        (
            [
                "arms.pretrained-head.schedule={kind: stages, stages: [{rounds: 1, policy: "
                "{kind: head_only}}, {rounds: null, policy: {kind: local_batchnorm}}]}"
            ],
            "pretrained-head",
        ),
        ([], "scratch"),
    ],
    ids=["fedavg", "scaffold", "staged", "scratch"],
)
def test_deployed_rounds_equal_the_simulator(tmp_path: Path, extra: list[str], arm: str) -> None:
    cfg = _config(extra, arm)
    run_experiment(cfg, tmp_path / "sim")
    simulated = load_state(tmp_path / "sim" / "checkpoints" / arm)
    state, reports, asked, _ = _deployed(cfg, tmp_path / "dep", arm)
    assert state.round == simulated.round == 3
    assert tree.sha256(state.params) == tree.sha256(simulated.params)
    assert tree.sha256(state.server) == tree.sha256(simulated.server)
    assert state.ledger == simulated.ledger
    assert all(len(c) == 3 for c in asked)
    assert [r.cohort for r in reports] == [tuple(c) for c in asked]


def test_a_client_that_does_not_answer_is_rejected_and_the_rest_aggregate(tmp_path: Path) -> None:
    cfg = _config([], "pretrained-full")
    _, recipe, state = start_state(cfg, tmp_path, "pretrained-full")
    population = build_population(cfg)

    def send(requests: list[Request]) -> dict[str, Reply]:
        out = {}
        for req in requests[1:]:
            out[req.client] = client_round(
                req, Holdings(), population.train[req.client], recipe, model_fn=cfg.model
            )[0]
        return out

    before = tree.clone(state.params)
    new, rep = deployed_round(recipe, state, population.clients, send, model_fn=cfg.model)
    assert len(rep.rejected) == 1 and "no reply" in rep.rejected[0][1]
    assert len(rep.accepted) == 2
    silent = rep.rejected[0][0]  # never answered: it gets the starting weights next time
    assert silent not in new.distribution.set_up and set(rep.accepted) <= set(
        new.distribution.set_up
    )
    assert not all(torch.equal(before[k], new.params[k]) for k in before)


def test_a_client_refuses_a_tampered_start_and_a_stage_mismatch(tmp_path: Path) -> None:
    cfg = _config([], "pretrained-full")
    _, recipe, state = start_state(cfg, tmp_path, "pretrained-full")
    population = build_population(cfg)
    c = population.clients[0]
    captured: list[Request] = []

    def send(requests: list[Request]) -> dict[str, Reply]:
        captured.extend(requests)
        return {}

    deployed_round(recipe, state, population.clients, send, model_fn=cfg.model)
    req = next(r for r in captured if r.setup is not None)
    bad = Request(**{**req.__dict__, "start_sha256": "0" * 64})
    with pytest.raises(CompatibilityError, match="does not match"):
        client_round(bad, Holdings(), population.train[req.client], recipe, model_fn=cfg.model)
    other = Request(**{**req.__dict__, "stage": 1})
    with pytest.raises(CompatibilityError, match="stage"):
        client_round(other, Holdings(), population.train[c], recipe, model_fn=cfg.model)
    no_setup = Request(**{**req.__dict__, "setup": None})
    reply, kept = client_round(
        no_setup, Holdings(), population.train[c], recipe, model_fn=cfg.model
    )
    assert reply.error.startswith(NEEDS_SETUP) and not reply.uplink
    assert not (kept.start or kept.local or kept.memory)  # it still holds nothing


def test_a_client_that_lost_its_starting_weights_is_set_up_again(tmp_path: Path) -> None:
    """A deployed client restarted with the same key (the same node id) says it needs the
    set-up: the server forgets it was set up and sends the set-up the next time."""
    cfg = load_config(None, SMALL)
    _, recipe, state = start_state(cfg, tmp_path, "scratch")
    clients = [str(i) for i in range(cfg.data.num_clients)]
    state = state.distributed(set_up=tuple(clients))
    sent: list[list[Request]] = []

    def send(requests: list[Request]) -> dict[str, Reply]:
        sent.append(list(requests))
        return {
            q.client: Reply(q.client, b"", 0, error=NEEDS_SETUP + "restarted") for q in requests
        }

    state, report = deployed_round(recipe, state, clients, send, model_fn=cfg.model)
    lost = set(report.cohort)
    assert lost and not lost & set(state.distribution.set_up)
    assert all(q.setup is None for q in sent[0])
    deployed_round(recipe, state, clients, send, model_fn=cfg.model)
    assert all(q.setup is not None for q in sent[1] if q.client in lost)


def test_start_state_refuses_arms_that_do_not_deploy(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL)
    with pytest.raises(ConfigError, match="not in the configuration"):
        start_state(cfg, tmp_path, "nope")


def test_a_resumed_deployment_sets_clients_up_again_and_continues(tmp_path: Path) -> None:
    from fedtransfer.deploy.federation import resumed
    from fedtransfer.state import save_state

    cfg = _config([], "pretrained-full")
    run_experiment(cfg, tmp_path / "sim")
    simulated = load_state(tmp_path / "sim" / "checkpoints" / "pretrained-full")
    _, recipe, state = start_state(cfg, tmp_path / "dep", "pretrained-full")
    population = build_population(cfg)
    held = {c: Holdings() for c in population.clients}

    def send(requests: list[Request]) -> dict[str, Reply]:
        out = {}
        for req in requests:
            out[req.client], held[req.client] = client_round(
                req, held[req.client], population.train[req.client], recipe, model_fn=cfg.model
            )
        return out

    for _ in range(2):
        state, _ = deployed_round(recipe, state, population.clients, send, model_fn=cfg.model)
    save_state(state, tmp_path / "ck")
    held = {c: Holdings() for c in population.clients}  # the new run's nodes hold nothing
    state = resumed(load_state(tmp_path / "ck"))
    state, rep = deployed_round(recipe, state, population.clients, send, model_fn=cfg.model)
    assert not rep.rejected and rep.setup_bytes > 0
    assert tree.sha256(state.params) == tree.sha256(simulated.params)
