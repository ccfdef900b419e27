"""The deployed server on Flower: wait for the clients, then run the arm's rounds with the
simulator's server code over Flower messages (plain, or SecAgg+), checkpointing every round."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from fedtransfer import tree
from fedtransfer.client.update import SETUP_CODEC
from fedtransfer.deploy.federation import deployed_round, resumed
from fedtransfer.deploy.flower_wire import fields_of, reply_of, request_message, wire_nbytes
from fedtransfer.deploy.secure import SecureAggregation, secure_sum
from fedtransfer.errors import FedTransferError
from fedtransfer.experiment.run import start_state
from fedtransfer.experiment.schema import ExperimentConfig
from fedtransfer.rounds.messages import Reply, Request, Send
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.state import ServerState, load_state, save_state

log = logging.getLogger(__name__)


QUERY_SECONDS = 15.0
"""How long a round waits for its nodes to say which client they hold (a node that does not
answer sits the round out, and is asked again next round)."""


def serve(
    grid: Grid,
    cfg: ExperimentConfig,
    run_config: Mapping[str, Any],
    *,
    context: Context | None = None,
) -> ServerState:
    """Run (or resume) the deployed arm; writes ``metrics.jsonl`` and checkpoints. With
    ``secure`` in the run config, every round's updates are aggregated by SecAgg+."""
    torch.set_num_threads(int(run_config.get("threads", 1)))
    out, arm_name = Path(str(run_config["out-dir"])), str(run_config["arm"])
    timeout = float(run_config.get("timeout", 300))
    # a round waits for its replies until the participation deadline (seconds), if one is set
    deadline = cfg.participation.deadline if cfg.participation else None
    deadline = timeout if deadline is None else deadline
    folder = out / "checkpoints" / arm_name
    _, schedule, state = start_state(cfg, out, arm_name)
    if (folder / "latest.json").exists():  # a restarted server never loses a finished round
        state = resumed(load_state(folder))
        log.warning("deploy: continuing from round %d; clients are set up again", state.round)
    nodes = _connect(grid, cfg.data.num_clients, timeout)
    clients = sorted(nodes, key=lambda c: nodes[c][1])
    log.info("deploy: %d clients online: %s", len(clients), clients)
    secure = _secure(grid, context, cfg, schedule, state, nodes, run_config, timeout)
    while state.round < cfg.rounds:
        live, moved = _rediscover(grid, nodes, min(timeout, QUERY_SECONDS))
        moved &= set(state.distribution.set_up)
        if moved:  # restarted clients hold nothing: set them up again
            log.warning("deploy: clients %s rejoined holding nothing", sorted(moved))
            dist = state.distribution
            state = state.replace(
                distribution=replace(
                    dist,
                    set_up=tuple(c for c in dist.set_up if c not in moved),
                    synced={c: i for c, i in dist.synced.items() if c not in moved},
                )
            )
        transport = _Transport(grid, {c: n for c, n in nodes.items() if n[0] in live}, deadline)
        send: Send = transport
        if secure is not None:
            uplink = schedule.recipe_at(state.round + 1).uplink
            send = secure_sum(secure, uplink=uplink, params=state.params)
        state, rep = deployed_round(
            schedule,
            state,
            clients,
            send,
            model_fn=cfg.model,
            example_counts=lambda c: float(nodes[c][2]) if c in nodes else None,
        )
        save_state(state, folder)
        record = {
            "round": state.round,
            "cohort": list(rep.cohort),
            "accepted": list(rep.accepted),
            "rejected": [c for c, _ in rep.rejected],
            "rejected_reasons": {c: why for c, why in rep.rejected},
            "bytes_up": rep.bytes_up,
            "bytes_down": rep.bytes_down,
            "setup_bytes": rep.setup_bytes,
            "flower_bytes_down": transport.down,
            "flower_bytes_up": transport.up,
            "seconds": rep.seconds,
            "params_sha256": tree.sha256(state.params),
        }
        if state.round == cfg.rounds or (
            int(run_config.get("eval-every", 0))
            and (state.round % int(run_config["eval-every"]) == 0)
        ):
            online = {c: n for c, n in nodes.items() if n[0] in live}
            record.update(_evaluate(grid, schedule, state, online, timeout))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("deploy: round %d done in %.1f s", state.round, rep.seconds)
    return state


def _secure(
    grid: Grid,
    context: Context | None,
    cfg: ExperimentConfig,
    schedule: Schedule,
    state: ServerState,
    nodes: Mapping[str, tuple[int, int, int]],
    run_config: Mapping[str, Any],
    timeout: float,
) -> Any:
    """The SecAgg+ transport when the run asks for it, its settings checked before round 1."""
    if not run_config.get("secure", False):
        return None
    from fedtransfer.deploy.flower_secure import SecureTransport

    if context is None:
        raise FedTransferError("deploy: secure aggregation needs the ServerApp's context")
    settings = SecureAggregation(
        num_shares=float(run_config.get("secure-num-shares", 1.0)),
        reconstruction_threshold=float(run_config.get("secure-threshold", 0.67)),
        quantization_range=int(run_config.get("secure-quantization-range", 2**22)),
        modulus_range=int(run_config.get("secure-modulus-range", 2**32)),
    )
    recipe = schedule.recipe_at(state.round + 1)
    plan = recipe.plan(schedule.prepared(cfg.model)())
    cohort = len(recipe.sampler.sample(list(nodes), seed=state.seed, round=state.round + 1))
    clip = settings.clipping_range(recipe, cohort, params=state.params, plan=plan)
    return SecureTransport(
        grid,
        context,
        {c: n for c, (n, _, _) in nodes.items()},
        settings=settings,
        clipping_range=clip,
        max_weight=float(max(w for _, _, w in nodes.values())),
        keys=sorted(state.params),
        timeout=timeout,
    )


class _Transport:
    """One round's requests as Flower messages to their clients' nodes, the replies back; it
    records each message's size on the wire."""

    def __init__(self, grid: Grid, nodes: Mapping[str, tuple[int, int, int]], timeout: float):
        self.grid, self.nodes, self.timeout = grid, nodes, timeout
        self.down: list[int] = []
        self.up: list[int] = []

    def __call__(self, requests: Sequence[Request]) -> dict[str, Reply]:
        requests = [r for r in requests if r.client in self.nodes]  # the others are offline
        msgs = [request_message(r, self.nodes[r.client][0]) for r in requests]
        self.down = [wire_nbytes(m) for m in msgs]
        asked = {self.nodes[r.client][0]: r.client for r in requests}
        replies: dict[str, Reply] = {}
        for answer in self.grid.send_and_receive(msgs, timeout=self.timeout):
            client = asked.get(answer.metadata.src_node_id)
            if client is None or client in replies:  # not asked this round, or answered twice
                log.warning("deploy: dropped a reply from node %s", answer.metadata.src_node_id)
                continue
            if answer.has_error():
                log.warning("deploy: client %s failed: %s", client, answer.error.reason)
                continue
            self.up.append(wire_nbytes(answer))
            replies[client] = reply_of(answer, client=client)
        return replies


def _connect(grid: Grid, expected: int, timeout: float) -> dict[str, tuple[int, int, int]]:
    """client name → (node id, partition, training examples), once ``expected`` nodes answer
    a query."""
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FedTransferError(
                f"deploy: {len(ids)} of {expected} clients connected within {timeout:.0f} s; "
                "hint: start one client per partition-id 0..N-1 (fedtransfer deploy client)"
            )
        time.sleep(1.0)
    return _query(grid, ids, timeout)[0]


def _rediscover(
    grid: Grid, nodes: dict[str, tuple[int, int, int]], timeout: float
) -> tuple[set[int], set[str]]:
    """Before each round, ask every node online which client it holds and whether it holds
    the starting weights. Returns the nodes that answered (only they are sent the round) and
    the clients that hold nothing (new, or restarted: on a new node or the same one), whose
    entries in ``nodes`` are updated and who are set up again. A node that does not answer
    within ``timeout`` sits this round out, and is asked again next round."""
    ids = sorted(grid.get_node_ids())
    found, empty = _query(grid, ids, timeout, strict=False)
    moved = {name for name, entry in found.items() if nodes.get(name, entry)[0] != entry[0]}
    nodes.update(found)
    return {entry[0] for entry in found.values()}, moved | empty


def _query(
    grid: Grid, ids: Sequence[int], timeout: float, *, strict: bool = True
) -> tuple[dict[str, tuple[int, int, int]], set[str]]:
    """Ask nodes ``ids`` which client they hold: name → (node id, partition, examples), and
    the clients that hold no starting weights. ``strict``: a node that fails or answers
    malformed fields is an error; otherwise it is skipped, with a warning."""
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in ids]
    nodes: dict[str, tuple[int, int, int]] = {}
    empty: set[str] = set()
    for answer in grid.send_and_receive(msgs, timeout=timeout):
        node = answer.metadata.src_node_id
        try:
            if answer.has_error():
                raise FedTransferError(f"deploy: node {node} failed: {answer.error.reason}")
            f = fields_of(answer)
            name, partition, count = str(f["client"]), int(f["partition"]), int(f["num_examples"])
        except (FedTransferError, KeyError, TypeError, ValueError) as exc:
            if not strict:
                log.warning("deploy: node %s did not answer the query usably: %s", node, exc)
                continue
            if isinstance(exc, FedTransferError):
                raise
            raise FedTransferError(
                f"deploy: node {node} answered the query with malformed fields ({exc!r}); "
                "hint: run the same fedtransfer version and config on every client"
            ) from None
        if name in nodes:
            why = f"deploy: nodes {nodes[name][0]} and {node} both hold client {name}"
            if strict:
                raise FedTransferError(f"{why} (same partition-id)")
            log.warning("%s; keeping the first", why)
            continue
        nodes[name] = (node, partition, count)
        if not f.get("holds_start", 1):
            empty.add(name)
    return nodes, empty


def _evaluate(
    grid: Grid,
    schedule: Schedule,
    state: ServerState,
    nodes: Mapping[str, tuple[int, int, int]],
    timeout: float,
) -> dict[str, Any]:
    current = schedule.recipe_at(state.round)  # the codec the clients decode with
    downlink = current.downlink.encode(state.params).to_bytes()
    setup = SETUP_CODEC.encode(state.distribution.start).to_bytes()
    msgs = [
        request_message(
            Request(
                c,
                state.round,
                state.seed,
                state.distribution.stage,
                state.distribution.start_sha256,
                downlink,
                setup=None if c in state.distribution.set_up else setup,
            ),
            n,
            kind="evaluate",
        )
        for c, (n, _, _) in nodes.items()
    ]
    per_client = {}
    for a in grid.send_and_receive(msgs, timeout=timeout):
        if not a.has_error():
            f = fields_of(a)
            per_client[str(f["client"])] = (float(f["accuracy"]), float(f["examples"]))
    total = sum(n for _, n in per_client.values())
    accuracy = sum(acc * n for acc, n in per_client.values()) / total if total else float("nan")
    return {"accuracy": accuracy, "client_accuracy": {c: a for c, (a, _) in per_client.items()}}
