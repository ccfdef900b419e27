"""Experiment arms end to end on a tiny run: local-only and centralised baselines, personalised
accuracy in the summary, a threat on the federated arms, and a FedBuff arm that resumes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from fedtransfer import tree
from fedtransfer.experiment.run import final_weights, load_config, resume, run_experiment
from fedtransfer.state import load_state

ARMS = "arms=[{name: fed, init: scratch}, {name: alone, init: scratch, mode: local-only}, " + (
    "{name: pooled, init: scratch, mode: centralised}]"
)
SMALL = [
    "rounds=2",
    "data.num_clients=4",
    "sampler={kind: all}",
    "model.channels=[4, 8]",
    "model.hidden=16",
    "training.steps=2",
    "training.batch_size=16",
    "personalization.steps=2",
    "personalization.lr=0.05",
]
ZERO_BYTES = ("bytes_up", "bytes_down", "round_bytes", "cum_bytes", "setup_bytes")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread_module: None) -> None:
    """Tiny models: intra-op threads only slow them down (see ``single_thread``)."""


def _run(run_dir: Path, *overrides: str) -> dict[str, Any]:
    summary: dict[str, Any] = run_experiment(load_config(None, [*SMALL, *overrides]), run_dir)
    return summary


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("arms")
    return run_dir, _run(run_dir, ARMS)


def test_arms_metrics_have_every_round_of_every_arm(
    arms_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, _ = arms_run
    keys = [(r["arm"], r["round"]) for r in _records(run_dir)]
    assert keys == [(a, r) for a in ("fed", "alone", "pooled") for r in range(3)]


@pytest.mark.parametrize("arm", ["alone", "pooled"])
def test_arms_without_federation_record_zero_bytes(
    arm: str, arms_run: tuple[Path, dict[str, Any]]
) -> None:
    run_dir, summary = arms_run
    for record in (r for r in _records(run_dir) if r["arm"] == arm):
        assert all(record[k] == 0 for k in (*ZERO_BYTES, "cum_setup_bytes")), record["round"]
        assert record["accepted"] == 0 and record["rejected"] == 0
    assert summary["arms"][arm]["total_bytes"] == 0
    assert summary["arms"][arm]["setup_bytes"] == 0


@pytest.mark.parametrize("arm", ["alone", "pooled"])
def test_arms_without_federation_train_every_round(
    arm: str, arms_run: tuple[Path, dict[str, Any]]
) -> None:
    run_dir, _ = arms_run
    records = [r for r in _records(run_dir) if r["arm"] == arm]
    assert records[0]["train_loss"] is None
    assert all(r["train_loss"] is not None and r["train_loss"] > 0 for r in records[1:])
    assert records[-1]["loss"] != records[0]["loss"]


def test_arms_federated_arm_records_bytes(arms_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, summary = arms_run
    fed = [r for r in _records(run_dir) if r["arm"] == "fed"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in fed[1:])
    assert summary["arms"]["fed"]["total_bytes"] == fed[-1]["cum_bytes"] > 0


def test_arms_local_only_clients_keep_their_own_models(
    arms_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, _ = arms_run
    state = load_state(run_dir / "checkpoints" / "alone")
    clients = sorted(state.holdings.local)
    assert len(clients) == 4
    for a, b in itertools.pairwise(clients):
        assert not tree.equal(state.weights_for(a), state.weights_for(b)), (a, b)
    assert tree.equal(state.params, tree.select(state.distribution.start, state.params))


def test_arms_centralised_trains_one_model(arms_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = arms_run
    state = load_state(run_dir / "checkpoints" / "pooled")
    assert not tree.equal(state.params, tree.select(state.distribution.start, state.params))
    records = [r for r in _records(run_dir) if r["arm"] == "pooled"]
    assert records[-1]["accepted"] == 0


@pytest.mark.parametrize("arm", ["fed", "alone", "pooled"])
def test_arms_summary_has_personal_accuracy_when_personalization_is_on(
    arm: str, arms_run: tuple[Path, dict[str, Any]]
) -> None:
    run_dir, summary = arms_run
    s = summary["arms"][arm]
    for key in ("personal_accuracy", "personal_client_mean", "personal_client_p10"):
        assert isinstance(s[key], float) and 0.0 <= s[key] <= 1.0, key
    records = [r for r in _records(run_dir) if r["arm"] == arm]
    assert set(records[-1]["personal_client_accuracy"]) == set(records[-1]["client_accuracy"])
    assert all("personal_accuracy" not in r for r in records[:-1])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["arms"][arm]["personal_accuracy"] == s["personal_accuracy"]


def test_arms_summary_has_no_personal_accuracy_when_personalization_is_null(
    tmp_path: Path,
) -> None:
    arms = "arms=[{name: alone, init: scratch, mode: local-only}]"
    summary = _run(tmp_path, arms, "personalization=null")
    s = summary["arms"]["alone"]
    assert s.get("personal_accuracy") is None
    assert s.get("personal_client_mean") is None and s.get("personal_client_p10") is None
    assert all("personal_accuracy" not in r for r in _records(tmp_path))


def test_arms_personalization_without_steps_equals_global_accuracy(tmp_path: Path) -> None:
    """Zero fine-tuning steps with the plain objective: the personal model is the held one."""
    arms = "arms=[{name: alone, init: scratch, mode: local-only}]"
    summary = _run(tmp_path, arms, "personalization.steps=0")
    last = _records(tmp_path)[-1]
    assert last["personal_client_accuracy"] == last["client_accuracy"]
    assert summary["arms"]["alone"]["personal_accuracy"] == pytest.approx(last["accuracy"])


def test_arms_threat_attacks_the_federated_arm_only(
    tmp_path: Path, arms_run: tuple[Path, dict[str, Any]]
) -> None:
    clean_dir, _ = arms_run
    arms = "arms=[{name: fed, init: scratch}, {name: alone, init: scratch, mode: local-only}]"
    threat = "threat={attack: {kind: sign_flip, scale: 3.0}, fraction: 0.5}"
    _run(tmp_path, arms, threat)
    assert "sign_flip" in (tmp_path / "config.resolved.yaml").read_text()
    fed = [r for r in _records(tmp_path) if r["arm"] == "fed"]
    assert [r["round"] for r in fed] == [0, 1, 2]
    assert all(r["accepted"] == 4 for r in fed[1:])
    assert not tree.equal(final_weights(tmp_path, "fed"), final_weights(clean_dir, "fed"))
    attacked = load_state(tmp_path / "checkpoints" / "alone")
    clean = load_state(clean_dir / "checkpoints" / "alone")
    assert all(
        tree.equal(attacked.holdings.local[c], clean.holdings.local[c])
        for c in clean.holdings.local
    )


FEDBUFF = [
    "rounds=3",
    "personalization=null",
    "arms=[{name: buff, init: scratch, fedbuff: {buffer_size: 2, concurrency: 3}}]",
]


class _Stop(Exception):
    """Raised by an observer to interrupt a run after a checkpoint, as a crash would."""


def _stop_after_round(round_: int) -> Any:
    def observer(event: str, payload: dict[str, Any]) -> None:
        if event == "round" and payload["round"] == round_:
            raise _Stop

    return observer


def test_arms_fedbuff_arm_aggregates_buffer_size_updates_per_round(tmp_path: Path) -> None:
    _run(tmp_path, *FEDBUFF)
    records = _records(tmp_path)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["accepted"] == 2 for r in records[1:])
    assert all(r["bytes_up"] > 0 for r in records[1:])
    assert len(load_state(tmp_path / "checkpoints" / "buff").inflight.pending) == 1


def test_arms_fedbuff_arm_resumes_bit_identical(tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run(straight, *FEDBUFF)
    config = load_config(None, [*SMALL, *FEDBUFF])
    with pytest.raises(_Stop):
        run_experiment(config, stopped, observer=_stop_after_round(1))
    assert load_state(stopped / "checkpoints" / "buff").round == 1
    resume(stopped)
    assert tree.equal(final_weights(stopped, "buff"), final_weights(straight, "buff"))
    a = load_state(straight / "checkpoints" / "buff")
    b = load_state(stopped / "checkpoints" / "buff")
    assert [p.meta() for p in a.inflight.pending] == [p.meta() for p in b.inflight.pending]
    assert a.inflight.clock == b.inflight.clock and a.ledger == b.ledger
    drop = ("seconds", "eval_seconds")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _records(straight)]
    assert [{k: v for k, v in r.items() if k not in drop} for r in _records(stopped)] == strip


def test_arms_threat_run_records_attack_metrics(tmp_path: Path) -> None:
    small = [
        "rounds=2",
        "data.num_clients=4",
        "sampler={kind: all}",
        "model.channels=[4, 8]",
        "model.hidden=16",
        "training.steps=2",
        "training.batch_size=16",
        "personalization=null",
        "arms=[{name: fed, init: scratch}]",
        "threat={attack: {kind: sign_flip}, fraction: 0.5}",
    ]
    run_experiment(load_config(None, small), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["round_metrics"]["attack/malicious"] == 2.0
    assert "server/aggregator/clients" in last["round_metrics"]
