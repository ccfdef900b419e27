"""A real Flower federation on loopback: a SuperLink and three SuperNodes as separate processes,
TLS and node authentication on, three rounds of the default recipe on digits. The final global
weights equal the simulator's bit for bit (same seed, same cohorts, one torch thread on both
sides: every client runs the same code on the same bytes), and an unregistered node and a
plaintext node are refused."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedtransfer import tree
from fedtransfer.deploy.commands import Deployment, client_process, run_server
from fedtransfer.deploy.launch import make_credentials
from fedtransfer.experiment.run import load_config, run_experiment
from fedtransfer.state import load_state

pytestmark = pytest.mark.usefixtures("single_thread")

ARM = "pretrained-full"
SETTINGS = [
    "rounds=3",
    "data.num_clients=3",
    "sampler.clients_per_round=2",
    "pretrain.training.epochs=1",
    "personalization=null",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flower_deployment_equals_the_simulator_and_refuses_strangers(tmp_path: Path) -> None:
    cfg = load_config(Path(__file__).parents[2] / "configs" / "default.yaml", SETTINGS)
    cfg = replace(cfg, arms=tuple(a for a in cfg.arms if a.name == ARM))
    run_experiment(cfg, tmp_path / "sim")
    simulated = load_state(tmp_path / "sim" / "checkpoints" / ARM)
    shutil.copytree(tmp_path / "sim" / "pretrain", tmp_path / "dep" / "pretrain")

    creds = make_credentials(tmp_path / "creds", nodes=3)
    stranger = make_credentials(tmp_path / "stranger", nodes=1)
    address = f"127.0.0.1:{_free_port()}"
    ready = threading.Event()
    outcome: dict[str, Deployment | BaseException] = {}

    def serve() -> None:
        try:
            outcome["done"] = run_server(
                cfg,
                arm=ARM,
                creds=creds,
                address=address,
                run_dir=tmp_path / "dep",
                timeout=180,
                say=lambda text: ready.set() if "node keys allowed" in text else None,
            )
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc
            ready.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    assert ready.wait(120), "the SuperLink did not come up"
    assert "error" not in outcome, outcome.get("error")
    nodes = [
        client_process(
            superlink=address,
            creds=creds,
            partition=i,
            num_partitions=3,
            port=_free_port(),
            home=tmp_path / f"node{i}",
            log=tmp_path / f"node{i}.log",
        )
        for i in range(3)
    ]
    try:
        unregistered = client_process(
            superlink=address,
            creds=creds,
            partition=0,
            num_partitions=3,
            port=_free_port(),
            home=tmp_path / "stranger-node",
            log=tmp_path / "unregistered.log",
            key=stranger.node_key(0),
            max_retries=2,
        )
        plaintext = client_process(
            superlink=address,
            creds=creds,
            partition=1,
            num_partitions=3,
            port=_free_port(),
            home=tmp_path / "plain-node",
            log=tmp_path / "plaintext.log",
            insecure=True,
            max_retries=2,
        )
        assert unregistered.wait(120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "unregistered.log").read_text()
        assert plaintext.wait(120) != 0
        server.join(400)
        assert not server.is_alive(), "the deployed run did not finish"
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    done = outcome["done"]
    assert isinstance(done, Deployment) and done.status == "finished:completed"

    deployed = load_state(tmp_path / "dep" / "checkpoints" / ARM)
    assert deployed.round == simulated.round == 3
    assert tree.sha256(deployed.params) == tree.sha256(simulated.params)
    assert deployed.ledger == simulated.ledger
    records = [json.loads(line) for line in (tmp_path / "dep" / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert len(r["cohort"]) == 2 and r["accepted"] == r["cohort"]
        assert len(r["flower_bytes_down"]) == 2 and len(r["flower_bytes_up"]) == 2
        assert min(r["flower_bytes_up"]) * 2 >= r["bytes_up"]  # the payload travels inside
    assert 0.0 < records[-1]["accuracy"] <= 1.0


def test_flower_secure_aggregation_equals_the_simulator_up_to_quantisation(
    tmp_path: Path,
) -> None:
    from fedtransfer.deploy.secure import SecureAggregation

    arm = "pretrained-full"
    cfg = load_config(
        Path(__file__).parents[2] / "configs" / "default.yaml",
        [
            *SETTINGS,
            "rounds=2",
            "sampler.clients_per_round=3",
            "aggregator={kind: norm_bound, c: 5.0}",
            "arms.pretrained-full.policy={kind: local_batchnorm}",
        ],
    )
    cfg = replace(cfg, arms=tuple(a for a in cfg.arms if a.name == arm))
    run_experiment(cfg, tmp_path / "sim")
    simulated = load_state(tmp_path / "sim" / "checkpoints" / arm)
    shutil.copytree(tmp_path / "sim" / "pretrain", tmp_path / "dep" / "pretrain")
    creds = make_credentials(tmp_path / "creds", nodes=3)
    address = f"127.0.0.1:{_free_port()}"
    ready = threading.Event()
    outcome: dict[str, Deployment | BaseException] = {}
    settings = SecureAggregation()

    def serve() -> None:
        try:
            outcome["done"] = run_server(
                cfg,
                arm=arm,
                creds=creds,
                address=address,
                run_dir=tmp_path / "dep",
                timeout=180,
                secure=settings,
                say=lambda text: ready.set() if "node keys allowed" in text else None,
            )
        except BaseException as exc:
            outcome["error"] = exc
            ready.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    assert ready.wait(120) and "error" not in outcome, outcome.get("error")
    nodes = [
        client_process(
            superlink=address,
            creds=creds,
            partition=i,
            num_partitions=3,
            port=_free_port(),
            home=tmp_path / f"node{i}",
            log=tmp_path / f"node{i}.log",
        )
        for i in range(3)
    ]
    try:
        server.join(500)
        assert not server.is_alive(), "the secure run did not finish"
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    deployed = load_state(tmp_path / "dep" / "checkpoints" / arm)
    assert deployed.round == 2
    # round 1 from the same start: each coordinate of the mean is off by less than one
    # quantisation step of SecAgg+ (2c / levels; stochastic rounding), plus float32 rounding
    step = 2 * 5.0 / settings.quantization_range
    first = [_round_params(tmp_path / side / "checkpoints" / arm, 1) for side in ("sim", "dep")]
    assert 0 < _gap(*first) <= 1.2 * step
    # round 2 trains from those slightly different weights: the gap grows, boundedly
    assert _gap(deployed.params, simulated.params) < 1e-3
    records = [json.loads(line) for line in (tmp_path / "dep" / "metrics.jsonl").open()]
    assert [r["accepted"] for r in records] == [["secure-sum"], ["secure-sum"]]


def _round_params(folder: Path, round: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (state,) = folder.glob(f"round-{round:05d}-*/state.safetensors")
    return {k: v for k, v in load_file(str(state)).items() if k.startswith("params")}


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
