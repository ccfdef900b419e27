"""Flower's deployment engine carries the federation: a ``ServerApp`` and a ``ClientApp`` around
:mod:`fedtransfer.deploy.federation` (the only module that speaks Flower's words).

Payloads travel in our wire format, as raw byte arrays inside Flower records; only shared keys
(and, once, the starting weights) go out. A client's starting weights, local keys and memory
stay in its node's ``context.state`` between rounds. Both apps read the same experiment file,
bundled in the Flower app (:func:`fedtransfer.deploy.launch.write_app`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtransfer import tree
from fedtransfer.client.update import SETUP_CODEC
from fedtransfer.codecs import Payload
from fedtransfer.deploy.federation import (
    Holdings,
    Reply,
    Request,
    client_evaluate,
    client_round,
    resumed,
    server_round,
)
from fedtransfer.deploy.secure import SecureAggregation, secure_round
from fedtransfer.errors import FedTransferError
from fedtransfer.experiment.run import build_population, load_config, start_state
from fedtransfer.experiment.schema import ExperimentConfig
from fedtransfer.state import ServerState, load_state, save_state
from fedtransfer.transfer.schedule import stage_recipe

log = logging.getLogger(__name__)

KEY = "fedtransfer"
BLOBS = ("downlink", "broadcast", "setup", "handover", "uplink", "extras")


# --- messages ----------------------------------------------------------------------------


def _content(fields: Mapping[str, Any]) -> RecordDict:
    """Scalars in a config record, byte strings as raw uint8 arrays (chunked by Flower)."""
    blobs = {
        k: Array(np.frombuffer(v, dtype=np.uint8))
        for k, v in fields.items()
        if isinstance(v, bytes) and v
    }
    scalars = {k: v for k, v in fields.items() if not isinstance(v, bytes | type(None))}
    return RecordDict({KEY: ConfigRecord(scalars), f"{KEY}.bytes": ArrayRecord(blobs)})


def _fields(msg: Message) -> dict[str, Any]:
    content = msg.content
    out: dict[str, Any] = dict(content.config_records[KEY])
    blobs = content.array_records.get(f"{KEY}.bytes")
    if blobs is not None:
        out.update({k: blobs[k].numpy().tobytes() for k in blobs})
    return out


def request_message(req: Request, node_id: int, *, kind: str = "train") -> Message:
    """A Flower message carrying ``req`` to ``node_id``."""
    fields = {k: getattr(req, k) for k in Request.__dataclass_fields__}
    return Message(
        _content(fields), dst_node_id=node_id, message_type=kind, group_id=str(req.round)
    )


def request_of(msg: Message) -> Request:
    """The request a train or evaluate message carries."""
    return request_from(_fields(msg))


def request_from(f: Mapping[str, Any]) -> Request:
    """A :class:`Request` from its fields as a record holds them (absent bytes: ``None``)."""
    return Request(
        client=str(f["client"]),
        round=int(f["round"]),
        seed=int(f["seed"]),
        stage=int(f["stage"]),
        start_sha256=str(f["start_sha256"]),
        downlink=bytes(f.get("downlink", b"")),
        broadcast=f.get("broadcast"),
        setup=f.get("setup"),
        handover=f.get("handover"),
    )


def reply_of(msg: Message) -> Reply:
    f = _fields(msg)
    return Reply(
        client=str(f["client"]),
        uplink=f.get("uplink", b""),
        num_examples=int(f["num_examples"]),
        extras=f.get("extras", b""),
        metrics=json.loads(str(f.get("metrics", "{}"))),
        error=str(f.get("error", "")),
    )


def wire_nbytes(msg: Message) -> int:
    """The bytes Flower pushes for ``msg``: the serialised size of every object it is made of
    (message, records, arrays, chunks), before HTTP and TLS framing."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


# --- the client ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _client_side(config_path: str, partition: int) -> tuple[ExperimentConfig, str, Any]:
    cfg = load_config(config_path)
    population = build_population(cfg)
    if not 0 <= partition < len(population.clients):
        raise FedTransferError(
            f"partition-id {partition} is out of range: the configuration has "
            f"{len(population.clients)} clients (0..{len(population.clients) - 1})"
        )
    return cfg, population.clients[partition], population


def _holdings(context: Context) -> Holdings:
    rec = context.state.config_records.get(KEY)
    if rec is None:
        return Holdings()

    def dec(name: str) -> dict[str, torch.Tensor]:
        blob = rec[name]
        assert isinstance(blob, bytes)  # written by _keep
        return dict(SETUP_CODEC.decode(Payload.from_bytes(blob)))

    stage = rec["stage"]
    assert isinstance(stage, int)
    return Holdings(dec("start"), dec("local"), dec("memory"), stage)


def _keep(context: Context, held: Holdings) -> None:
    enc = {k: SETUP_CODEC.encode(getattr(held, k)).to_bytes() for k in ("start", "local", "memory")}
    context.state[KEY] = ConfigRecord({**enc, "stage": held.stage})


def client_app(config_path: str | Path, *, secure: bool = False) -> ClientApp:
    """The ``ClientApp``: train and evaluate handlers run the simulator's client code on the
    node's partition (``--node-config "partition-id=I"``) of the bundled experiment; with
    ``secure``, its updates are bounded and masked by SecAgg+ (``secaggplus_mod``)."""
    if secure:
        from flwr.client.mod import secaggplus_mod

        app = ClientApp(mods=[secaggplus_mod])
    else:
        app = ClientApp()
    path = str(config_path)

    def side(context: Context) -> tuple[ExperimentConfig, str, Any]:
        torch.set_num_threads(int(context.run_config.get("threads", 1)))
        return _client_side(path, int(context.node_config["partition-id"]))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        _, name, population = side(context)
        fields = {
            "client": name,
            "partition": int(context.node_config["partition-id"]),
            "num_examples": len(population.train[name]),
        }
        return Message(_content(fields), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, name, population = side(context)
        if secure:
            return _secure_train(msg, context, cfg, name, population)
        req = request_of(msg)
        if req.client != name:
            raise FedTransferError(f"this node holds client {name}, the server asked {req.client}")
        recipe = cfg.recipe(_arm(cfg, str(context.run_config["arm"])))
        reply, held = client_round(
            req, _holdings(context), population.train[name], recipe, model_fn=cfg.model
        )
        _keep(context, held)
        fields = {k: getattr(reply, k) for k in ("client", "uplink", "num_examples", "extras")}
        fields.update(metrics=json.dumps(reply.metrics), error=reply.error)
        return Message(_content(fields), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, name, population = side(context)
        req = request_of(msg)
        recipe = cfg.recipe(_arm(cfg, str(context.run_config["arm"])))
        ev = client_evaluate(
            req, _holdings(context), population.test[name], recipe, model_fn=cfg.model
        )
        return Message(_content({"client": name, **ev}), reply_to=msg)

    return app


def _secure_train(
    msg: Message, context: Context, cfg: ExperimentConfig, name: str, population: Any
) -> Message:
    from fedtransfer.deploy.flower_secure import fit_reply, request_of_fitins
    from fedtransfer.deploy.secure import bounded, norm_bound

    req = request_of_fitins(msg)
    if req.client != name:
        raise FedTransferError(f"this node holds client {name}, the server asked {req.client}")
    recipe = cfg.recipe(_arm(cfg, str(context.run_config["arm"])))
    reply, held = client_round(
        req, _holdings(context), population.train[name], recipe, model_fn=cfg.model
    )
    if reply.error:
        raise FedTransferError(reply.error)
    _keep(context, held)
    current, _ = stage_recipe(recipe, req.round)
    update = current.uplink.decode(Payload.from_bytes(reply.uplink))
    c = norm_bound(current)  # checked by the server before round 1
    return fit_reply(bounded(update, c), reply.num_examples, msg)


def _arm(cfg: ExperimentConfig, name: str) -> Any:
    return next(a for a in cfg.arms if a.name == name)


# --- the server ----------------------------------------------------------------------------


def server_app(config_path: str | Path) -> ServerApp:
    """The ``ServerApp``: waits for the configuration's clients, then runs the arm's rounds
    with the simulator's server code, checkpointing every finished round in ``out-dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, load_config(str(config_path)), dict(context.run_config), context=context)

    return app


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
    folder = out / "checkpoints" / arm_name
    _, recipe, state = start_state(cfg, out, arm_name)
    if (folder / "latest.json").exists():  # a restarted server never loses a finished round
        state = resumed(load_state(folder))
        log.warning("deploy: continuing from round %d; clients are set up again", state.round)
    nodes = _connect(grid, cfg.data.num_clients, timeout)
    clients = sorted(nodes, key=lambda c: nodes[c][1])
    log.info("deploy: %d clients online: %s", len(clients), clients)
    secure = _secure(grid, context, cfg, recipe, state, nodes, run_config, timeout)
    while state.round < cfg.rounds:
        send = _Transport(grid, nodes, timeout)
        if secure is not None:
            state, rep = secure_round(recipe, state, clients, secure, model_fn=cfg.model)
        else:
            state, rep = server_round(recipe, state, clients, send, model_fn=cfg.model)
        save_state(state, folder)
        record = {
            "round": state.round,
            "cohort": list(rep.cohort),
            "accepted": list(rep.accepted),
            "rejected": [c for c, _ in rep.rejected],
            "bytes_up": rep.bytes_up,
            "bytes_down": rep.bytes_down,
            "setup_bytes": rep.setup_bytes,
            "flower_bytes_down": send.down,
            "flower_bytes_up": send.up,
            "seconds": rep.seconds,
            "params_sha256": tree.sha256(state.params),
        }
        if state.round == cfg.rounds or (
            int(run_config.get("eval-every", 0))
            and (state.round % int(run_config["eval-every"]) == 0)
        ):
            record.update(_evaluate(grid, recipe, state, nodes, timeout))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("deploy: round %d done in %.1f s", state.round, rep.seconds)
    return state


def _secure(
    grid: Grid,
    context: Context | None,
    cfg: ExperimentConfig,
    recipe: Any,
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
    plan = recipe.plan(cfg.model())
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
        msgs = [request_message(r, self.nodes[r.client][0]) for r in requests]
        self.down = [wire_nbytes(m) for m in msgs]
        replies: dict[str, Reply] = {}
        for answer in self.grid.send_and_receive(msgs, timeout=self.timeout):
            if answer.has_error():
                log.warning("deploy: a client failed: %s", answer.error.reason)
                continue
            self.up.append(wire_nbytes(answer))
            rep = reply_of(answer)
            replies[rep.client] = rep
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
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in ids]
    nodes: dict[str, tuple[int, int, int]] = {}
    for answer in grid.send_and_receive(msgs, timeout=timeout):
        if answer.has_error():
            raise FedTransferError(f"deploy: a client failed to start: {answer.error.reason}")
        f = _fields(answer)
        name = str(f["client"])
        if name in nodes:
            raise FedTransferError(f"deploy: two nodes hold client {name} (same partition-id)")
        nodes[name] = (answer.metadata.src_node_id, int(f["partition"]), int(f["num_examples"]))
    return nodes


def _evaluate(
    grid: Grid,
    recipe: Any,
    state: ServerState,
    nodes: Mapping[str, tuple[int, int, int]],
    timeout: float,
) -> dict[str, Any]:
    current, _ = stage_recipe(recipe, state.round)  # the codec the clients decode with
    downlink = current.downlink.encode(state.params).to_bytes()
    setup = SETUP_CODEC.encode(state.start).to_bytes()
    msgs = [
        request_message(
            Request(
                c,
                state.round,
                state.seed,
                state.stage,
                state.start_sha256,
                downlink,
                setup=None if c in state.set_up else setup,
            ),
            n,
            kind="evaluate",
        )
        for c, (n, _, _) in nodes.items()
    ]
    per_client = {}
    for a in grid.send_and_receive(msgs, timeout=timeout):
        if not a.has_error():
            f = _fields(a)
            per_client[str(f["client"])] = (float(f["accuracy"]), float(f["examples"]))
    total = sum(n for _, n in per_client.values())
    accuracy = sum(acc * n for acc, n in per_client.values()) / total if total else float("nan")
    return {"accuracy": accuracy, "client_accuracy": {c: a for c, (a, _) in per_client.items()}}
