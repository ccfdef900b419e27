"""Flower's deployment engine carries the federation: a ``ServerApp`` and a ``ClientApp`` around
:mod:`fedtransfer.deploy.federation` (the ``deploy`` package is the only one that speaks
Flower's words; this module holds the two apps, :mod:`.flower_server` the server's loop,
:mod:`.flower_wire` the messages).

Payloads travel in our wire format, as raw byte arrays inside Flower records; only shared keys
(and, once, the starting weights) go out. A client's starting weights, local keys and memory
stay in its node's ``context.state`` between rounds. Both apps read the same experiment file,
bundled in the Flower app (:func:`fedtransfer.deploy.provision.write_app`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtransfer.client.update import SETUP_CODEC
from fedtransfer.codecs import Payload
from fedtransfer.deploy.federation import Holdings, client_evaluate, client_round
from fedtransfer.deploy.flower_server import serve
from fedtransfer.deploy.flower_wire import KEY, content, request_of
from fedtransfer.errors import FedTransferError
from fedtransfer.experiment.run import build_population, load_config
from fedtransfer.experiment.schema import ExperimentConfig
from fedtransfer.rounds.messages import Reply, Request

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
            # 0 on a node that has not trained yet in this run (a new or restarted node)
            "holds_start": int(context.state.config_records.get(KEY) is not None),
        }
        return Message(content(fields), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, name, population = side(context)
        if secure:
            return _secure_train(msg, context, cfg, name, population)
        reply, held = _train(request_of(msg), context, cfg, name, population)
        _keep(context, held)
        fields = {k: getattr(reply, k) for k in ("client", "uplink", "num_examples", "extras")}
        fields.update(metrics=json.dumps(reply.metrics), error=reply.error)
        return Message(content(fields), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, name, population = side(context)
        req = request_of(msg)
        schedule = cfg.schedule_of(cfg.arm(str(context.run_config["arm"])))
        ev = client_evaluate(
            req, _holdings(context), population.test[name], schedule, model_fn=cfg.model
        )
        return Message(content({"client": name, **ev}), reply_to=msg)

    return app


def _secure_train(
    msg: Message, context: Context, cfg: ExperimentConfig, name: str, population: Any
) -> Message:
    from fedtransfer.deploy.flower_secure import fit_reply, request_of_fitins
    from fedtransfer.deploy.secure import bounded, norm_bound

    req = request_of_fitins(msg)
    reply, held = _train(req, context, cfg, name, population)
    if reply.error:
        raise FedTransferError(reply.error)
    _keep(context, held)
    current = cfg.schedule_of(cfg.arm(str(context.run_config["arm"]))).recipe_at(req.round)
    update = current.uplink.decode(Payload.from_bytes(reply.uplink))
    c = norm_bound(current)  # checked by the server before round 1
    return fit_reply(bounded(update, c), reply.num_examples, msg)


def _train(
    req: Request, context: Context, cfg: ExperimentConfig, name: str, population: Any
) -> tuple[Reply, Holdings]:
    """This node's client round for ``req``, from what the node holds."""
    if req.client != name:
        raise FedTransferError(f"this node holds client {name}, the server asked {req.client}")
    schedule = cfg.schedule_of(cfg.arm(str(context.run_config["arm"])))
    return client_round(
        req, _holdings(context), population.train[name], schedule, model_fn=cfg.model
    )


# --- the server ----------------------------------------------------------------------------


def server_app(config_path: str | Path) -> ServerApp:
    """The ``ServerApp``: waits for the configuration's clients, then runs the arm's rounds
    with the simulator's server code, checkpointing every finished round in ``out-dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, load_config(str(config_path)), dict(context.run_config), context=context)

    return app
