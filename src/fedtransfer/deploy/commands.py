"""``fedtransfer deploy server`` and ``deploy client``: one federation run on Flower's
deployment engine, from an experiment file, with TLS and node authentication on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtransfer.deploy.provision import (
    CONNECTION,
    Credentials,
    flower_env,
    flwr,
    superlink_command,
    supernode_command,
    wait_healthy,
    write_app,
    write_connection,
)
from fedtransfer.deploy.secure import SecureAggregation
from fedtransfer.errors import FedTransferError
from fedtransfer.experiment.schema import ExperimentConfig


@dataclass(frozen=True)
class Deployment:
    """A finished deployed run: its folder (checkpoints, ``metrics.jsonl``, the Flower app and
    logs), Flower's run id and status, and Flower's own traffic count for the run."""

    run_dir: Path
    run_id: str
    status: str
    traffic: dict[str, Any]


def run_server(
    config: ExperimentConfig,
    *,
    arm: str,
    creds: Credentials,
    address: str,
    run_dir: str | os.PathLike[str],
    threads: int = 1,
    timeout: float = 600.0,
    eval_every: int = 0,
    secure: SecureAggregation | None = None,
    say: Callable[[str], None] = lambda _: None,
    on_ready: Callable[[], None] = lambda: None,
) -> Deployment:
    """Start a SuperLink (TLS, node authentication, the node keys in ``creds`` registered),
    submit ``arm`` of ``config`` as a Flower app, wait until it finishes, stop the SuperLink.
    The clients are started separately (:func:`client_process`, ``fedtransfer deploy
    client``), before or after."""
    config.arm(arm)  # refuses an arm the configuration does not have
    if secure is not None:
        _check_secure(config, arm, secure)
    root = Path(run_dir).resolve()
    home = root / "flower"
    app = write_app(
        config,
        root / "flower-app",
        arm=arm,
        out_dir=root,
        threads=threads,
        timeout=timeout,
        eval_every=eval_every,
        secure=secure,
    )
    home.mkdir(parents=True, exist_ok=True)
    for stale in home.glob("superlink.db*"):  # node keys are registered anew on every start
        stale.unlink()
    with open(home / "superlink.log", "ab") as log:
        link = subprocess.Popen(
            superlink_command(creds, address=address, database=home / "superlink.db"),
            env=flower_env(home / "link"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(address, creds.ca)
        write_connection(home / "cli", address=address, ca=creds.ca)
        for key in creds.node_public_keys():
            flwr(home / "cli", "supernode", "register", str(key), CONNECTION, "--name", key.stem)
        say(f"SuperLink on https://{address}: {len(creds.node_public_keys())} node keys allowed")
        on_ready()
        submitted = json.loads(flwr(home / "cli", "run", str(app), CONNECTION, "--format", "json"))
        run_id = str(submitted["run-id"])
        say(f"run {run_id} submitted; waiting for the clients and {config.rounds} rounds")
        status, traffic = _wait(home / "cli", run_id, timeout + 60.0 * config.rounds)
        (home / "serverapp.log").write_text(flwr(home / "cli", "log", run_id, CONNECTION, "--show"))
    finally:
        link.terminate()
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            link.kill()
    if status != "finished:completed":
        raise FedTransferError(
            f"deploy: run {run_id} ended {status}; see {home / 'serverapp.log'} and "
            f"{home / 'superlink.log'}"
        )
    return Deployment(root, run_id, status, traffic)


def _check_secure(config: ExperimentConfig, arm: str, secure: SecureAggregation) -> None:
    """Secure aggregation's settings against the arm's recipe, before anything starts."""
    from fedtransfer import tree

    schedule = config.schedule_of(config.arm(arm))
    recipe = schedule.recipe_at(1)
    model = recipe.policy.prepare(schedule.prepared(config.model)())
    plan = recipe.policy.plan(model)
    clients = [str(i) for i in range(config.data.num_clients)]
    cohort = len(recipe.sampler.sample(clients, seed=config.seed, round=1))
    secure.clipping_range(
        recipe, cohort, params=tree.select(model.state_dict(), plan.shared), plan=plan
    )


def _wait(home: Path, run_id: str, timeout: float) -> tuple[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        listing = json.loads(flwr(home, "ls", CONNECTION, "--run-id", run_id, "--format", "json"))
        run = listing["runs"][0]
        if str(run["status"]).startswith("finished") or time.monotonic() > deadline:
            return str(run["status"]), dict(run.get("network-traffic", {}))
        time.sleep(1.0)


def client_process(
    *,
    superlink: str,
    creds: Credentials,
    partition: int,
    num_partitions: int,
    port: int,
    home: str | os.PathLike[str],
    log: Path | None = None,
    insecure: bool = False,
    key: Path | None = None,
    max_retries: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start the SuperNode of client ``partition``: TLS against the credentials' CA and
    authenticated by ``node<partition>`` (or ``key``); ``insecure`` tries plaintext instead,
    which a TLS SuperLink refuses."""
    cmd = supernode_command(
        superlink=superlink,
        ca=None if insecure else creds.ca,
        key=None if insecure else (key or creds.node_key(partition)),
        partition=partition,
        num_partitions=num_partitions,
        port=port,
        max_retries=max_retries,
    )
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(
            cmd, env=flower_env(home), stdout=out, stderr=subprocess.STDOUT if out else None
        )
    finally:
        if out is not None:
            out.close()


def reconnecting(
    start: Callable[[], subprocess.Popen[bytes]],
    *,
    budget: float,
    say: Callable[[str], object],
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run the node ``start()`` makes until it exits cleanly (the run is over), restarting it
    whenever it exits with an error — the server not up yet, its SuperLink gone, a restart
    it refuses for a while — after 1, 2, 4 … (at most 30) seconds, with a line per attempt,
    for at most ``budget`` seconds in all. Returns the node's last exit status."""
    began, delay, attempt = clock(), 1.0, 1
    while True:
        code = start().wait()
        if code == 0:
            return 0
        spent = clock() - began
        if spent + delay > budget:
            say(f"the node exited with status {code}; giving up after {spent:.0f} s")
            return code
        say(
            f"the node exited with status {code} (attempt {attempt}); reconnecting in {delay:.0f} s"
        )
        sleep(delay)
        delay, attempt = min(2 * delay, 30.0), attempt + 1


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_loopback(
    config: ExperimentConfig,
    *,
    arm: str,
    root: str | os.PathLike[str],
    secure: SecureAggregation | None = None,
    timeout: float = 300.0,
    while_up: Callable[[str, Credentials, list[subprocess.Popen[bytes]]], None] | None = None,
) -> Deployment:
    """A whole deployment on this machine: test credentials, the server (a SuperLink) and
    one SuperNode per client, each its own process, TLS and node authentication on; all are
    stopped at the end. ``while_up(address, credentials, nodes)`` runs once the clients are
    started (e.g. to try a node the server must refuse, or to kill and restart a client: a
    node it puts in ``nodes`` is stopped at the end too). Results are under ``root / "dep"``."""
    from fedtransfer.deploy.provision import make_credentials

    folder = Path(root)
    n = config.data.num_clients
    creds = make_credentials(folder / "creds", nodes=n)
    address = f"127.0.0.1:{free_port()}"
    ready = threading.Event()
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            outcome["done"] = run_server(
                config,
                arm=arm,
                creds=creds,
                address=address,
                run_dir=folder / "dep",
                timeout=timeout,
                secure=secure,
                on_ready=ready.set,
            )
        except BaseException as exc:  # raised again in the calling thread
            outcome["error"] = exc
        finally:
            ready.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    ready.wait(timeout)
    nodes = []
    try:
        if "error" not in outcome:
            nodes = [
                client_process(
                    superlink=address,
                    creds=creds,
                    partition=i,
                    num_partitions=n,
                    port=free_port(),
                    home=folder / f"node{i}",
                    log=folder / f"node{i}.log",
                )
                for i in range(n)
            ]
            if while_up is not None:
                while_up(address, creds, nodes)
        server.join(timeout + 120.0 * config.rounds)
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
    if "error" in outcome:
        raise outcome["error"]
    if "done" not in outcome:
        raise FedTransferError(f"deploy: the loopback run did not finish; see {folder}")
    done: Deployment = outcome["done"]
    return done
