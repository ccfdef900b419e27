"""fedtransfer: federated transfer learning that measures whether transfer helps, and at what cost.

The core API: the recipe, the round, its state and report, the protocols a component
implements, the named recipes and schedules, the errors. Everything else lives in its
subpackage (``fedtransfer.codecs.TopK``, ``fedtransfer.server.Median``,
``fedtransfer.robustness.SignFlip``, ``fedtransfer.data.Digits``, ``fedtransfer.runtime.SerialRuntime`` …).
No logic lives here.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from fedtransfer import (  # noqa: F401  (the subpackages, as attributes: fedtransfer.codecs.TopK)
    client,
    codecs,
    data,
    models,
    robustness,
    rounds,
    runtime,
    server,
    state,
    transfer,
)
from fedtransfer.algorithms import (
    babu_then_head,
    ditto,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedbabu,
    feddyn,
    fedncm,
    fednova,
    fedprox,
    fedrep,
    fedyogi,
    lg_fedavg,
    lp_ft,
    progressive,
    scaffold,
)
from fedtransfer.client import LocalTraining, Objective
from fedtransfer.codecs import Codec
from fedtransfer.errors import CompatibilityError, ConfigError, FedTransferError, UpdateRejected
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.finalize import RoundReport
from fedtransfer.rounds.messages import Reply, Request, Send
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.rounds.spine import run_round, server_round
from fedtransfer.runtime import Runtime
from fedtransfer.server import Aggregator
from fedtransfer.server.sample import Sampler
from fedtransfer.state import ServerState
from fedtransfer.transfer import ParamPlan, TransferPolicy
from fedtransfer.types import UpdateContext, UpdateTransform

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Codec",
    "CompatibilityError",
    "ConfigError",
    "FedTransferError",
    "LocalTraining",
    "Objective",
    "ParamPlan",
    "Recipe",
    "Reply",
    "Request",
    "RoundReport",
    "Runtime",
    "Sampler",
    "Schedule",
    "Send",
    "ServerState",
    "TransferPolicy",
    "UpdateContext",
    "UpdateRejected",
    "UpdateTransform",
    "babu_then_head",
    "ditto",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedbabu",
    "feddyn",
    "fedncm",
    "fednova",
    "fedprox",
    "fedrep",
    "fedyogi",
    "lg_fedavg",
    "lp_ft",
    "progressive",
    "run_round",
    "scaffold",
    "server_round",
]

_MOVED = {
    # the names this package exported before the core was curated, and where they live now
    "ALIE": "fedtransfer.robustness",
    "AllClients": "fedtransfer.server",
    "Attack": "fedtransfer.robustness",
    "AutoRuntime": "fedtransfer.runtime",
    "BFloat16": "fedtransfer.codecs",
    "Bulyan": "fedtransfer.server",
    "CNN": "fedtransfer.models",
    "CenteredClipping": "fedtransfer.server",
    "ClientDelays": "fedtransfer.rounds.buffered",
    "ClientStore": "fedtransfer.state.clientstore",
    "ClientTask": "fedtransfer.client",
    "ClientTransform": "fedtransfer.client.transforms",
    "ClientUpdate": "fedtransfer.client",
    "Digits": "fedtransfer.data",
    "Dirichlet": "fedtransfer.data",
    "Ditto": "fedtransfer.client",
    "Dyn": "fedtransfer.client",
    "ErrorFeedback": "fedtransfer.client",
    "Exact": "fedtransfer.codecs",
    "FedBuff": "fedtransfer.rounds.buffered",
    "FederatedDataset": "fedtransfer.data",
    "Float16": "fedtransfer.codecs",
    "Float32": "fedtransfer.codecs",
    "FrozenHead": "fedtransfer.transfer",
    "Full": "fedtransfer.transfer",
    "GaussianAttack": "fedtransfer.robustness",
    "GlobalHead": "fedtransfer.transfer",
    "HFClassifier": "fedtransfer.models",
    "HeadOnly": "fedtransfer.transfer",
    "IID": "fedtransfer.data",
    "IPM": "fedtransfer.robustness",
    "Int8": "fedtransfer.codecs",
    "Krum": "fedtransfer.server",
    "LabelFlip": "fedtransfer.robustness",
    "LastK": "fedtransfer.transfer",
    "LazySplit": "fedtransfer.data",
    "LocalBatchNorm": "fedtransfer.transfer",
    "Lora": "fedtransfer.transfer",
    "MNIST5k": "fedtransfer.data",
    "Mean": "fedtransfer.server",
    "Median": "fedtransfer.server",
    "MultiKrum": "fedtransfer.server",
    "NearestClassMean": "fedtransfer.client",
    "NormBound": "fedtransfer.server",
    "Nova": "fedtransfer.client",
    "Payload": "fedtransfer.codecs",
    "PayloadError": "fedtransfer.errors",
    "PeftAdapters": "fedtransfer.transfer",
    "PersonalHead": "fedtransfer.transfer",
    "Personalization": "fedtransfer.client",
    "Plain": "fedtransfer.client",
    "PlanError": "fedtransfer.errors",
    "PretrainSpec": "fedtransfer.transfer",
    "ProcessRuntime": "fedtransfer.runtime",
    "Prox": "fedtransfer.client",
    "QuantitySkew": "fedtransfer.data",
    "RayRuntime": "fedtransfer.runtime",
    "Rep": "fedtransfer.client",
    "Rules": "fedtransfer.transfer",
    "Scaffold": "fedtransfer.client",
    "Scale": "fedtransfer.robustness",
    "SerialRuntime": "fedtransfer.runtime",
    "ServerAdagrad": "fedtransfer.server",
    "ServerAdam": "fedtransfer.server",
    "ServerPipeline": "fedtransfer.server",
    "ServerSGD": "fedtransfer.server",
    "ServerYogi": "fedtransfer.server",
    "Shards": "fedtransfer.data",
    "SignFlip": "fedtransfer.robustness",
    "SmallCNN": "fedtransfer.models",
    "TensorData": "fedtransfer.data",
    "Threat": "fedtransfer.robustness",
    "TopK": "fedtransfer.codecs",
    "TrimmedMean": "fedtransfer.server",
    "Uniform": "fedtransfer.server",
    "VectorizedRuntime": "fedtransfer.runtime",
    "client_update": "fedtransfer.client",
    "evaluate": "fedtransfer.client",
    "federate": "fedtransfer.data",
    "load_checkpoint": "fedtransfer.transfer",
    "load_state": "fedtransfer.state",
    "merge": "fedtransfer.transfer",
    "open_lazy_population": "fedtransfer.data",
    "pretrain": "fedtransfer.transfer",
    "run_buffered_step": "fedtransfer.rounds.buffered",
    "save_checkpoint": "fedtransfer.transfer",
    "save_state": "fedtransfer.state",
    "write_lazy_population": "fedtransfer.data",
}


def __getattr__(name: str) -> Any:
    """An old top-level name, from its subpackage, with a ``DeprecationWarning``."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _MOVED[name]
    warnings.warn(
        f"fedtransfer.{name} moved: import it from {where}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(where), name)
