"""SecAgg+ on Flower for a deployed round: Flower's ``SecAggPlusWorkflow`` (server) and
``secaggplus_mod`` (client) mask the clients' bounded updates, so the server receives only
their weighted mean (:mod:`fedtransfer.deploy.secure` does the rest)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from torch import Tensor

from fedtransfer.deploy.flower_wire import request_from, wire_nbytes
from fedtransfer.deploy.secure import SecureAggregation
from fedtransfer.rounds.messages import Request
from fedtransfer.types import Params


class _Metered:
    """A grid that counts the bytes of the replies it receives (every protocol stage)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.up = grid, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(wire_nbytes(r) for r in replies if not r.has_error())
        return replies


class _OneRound(Strategy):
    """The legacy strategy the workflow asks: our requests as fit instructions, and the
    unmasked mean handed back."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[Any, FitRes]] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return None


class SecureTransport:
    """One secure round: requests out as SecAgg+ fit instructions, the mean update back."""

    def __init__(
        self,
        grid: Grid,
        context: Context,
        nodes: Mapping[str, int],
        *,
        settings: SecureAggregation,
        clipping_range: float,
        max_weight: float,
        keys: Sequence[str],
        timeout: float,
    ) -> None:
        self.grid, self.context, self.nodes = grid, context, nodes
        self.settings, self.clip, self.max_weight = settings, clipping_range, max_weight
        self.keys, self.timeout = list(keys), timeout

    def __call__(self, requests: Sequence[Request]) -> tuple[Params, float, int]:
        run_id = self.context.run_id
        instructions = [
            (
                GridClientProxy(self.nodes[r.client], self.grid, run_id),
                FitIns(Parameters(tensors=[], tensor_type=""), _config(r)),
            )
            for r in requests
        ]
        strategy = _OneRound(instructions)
        legacy = LegacyContext(
            context=Context(
                run_id=run_id,
                node_id=self.context.node_id,
                node_config=self.context.node_config,
                state=RecordDict(),
                run_config=self.context.run_config,
            ),
            config=ServerConfig(num_rounds=1),
            strategy=strategy,
        )
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: requests[0].round if requests else 0}
        )
        legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        s = self.settings
        metered = _Metered(self.grid)
        SecAggPlusWorkflow(
            num_shares=s.num_shares,
            reconstruction_threshold=s.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clip,
            quantization_range=s.quantization_range,
            modulus_range=s.modulus_range,
            timeout=self.timeout,
        )(metered, legacy)  # type: ignore[arg-type]
        if not strategy.results:
            return {}, 0.0, metered.up
        arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
        weight = float(sum(res.num_examples for _, res in strategy.results))
        mean = {k: torch.from_numpy(np.asarray(a)) for k, a in zip(self.keys, arrays, strict=True)}
        return mean, weight, metered.up


def _config(req: Request) -> dict[str, Any]:
    fields = {k: getattr(req, k) for k in Request.__dataclass_fields__}
    return {k: v for k, v in fields.items() if v is not None}


def request_of_fitins(msg: Message) -> Request:
    """The request inside a SecAgg+ fit instruction."""
    return request_from(dict(recorddict_to_fitins(msg.content, keep_input=True).config))


def fit_reply(update: Mapping[str, Tensor], weight: int, msg: Message) -> Message:
    """A client's bounded update (keys in sorted order) as the fit result the mod masks."""
    arrays = [update[k].double().numpy() for k in sorted(update)]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(weight), {})
    return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)
