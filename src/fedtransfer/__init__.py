"""fedtransfer: federated transfer learning that measures whether transfer helps, and at what cost.

The public API, curated; no logic lives here.
"""

from fedtransfer.algorithms import fedadagrad, fedadam, fedavg, fedavgm, fedyogi
from fedtransfer.client import ClientResult, ClientTask, LocalTraining, client_update, evaluate
from fedtransfer.codecs import Codec, Float32, Payload
from fedtransfer.data import (
    IID,
    Digits,
    Dirichlet,
    FederatedDataset,
    MNIST5k,
    QuantitySkew,
    Shards,
    TensorData,
    federate,
)
from fedtransfer.errors import (
    CompatibilityError,
    ConfigError,
    FedTransferError,
    PayloadError,
    PlanError,
    UpdateRejected,
)
from fedtransfer.models import CNN, SmallCNN
from fedtransfer.recipe import Recipe
from fedtransfer.round import RoundReport, run_round
from fedtransfer.runtime import Runtime, SerialRuntime
from fedtransfer.server import (
    AllClients,
    Mean,
    ServerAdagrad,
    ServerAdam,
    ServerPipeline,
    ServerSGD,
    ServerYogi,
    Uniform,
)
from fedtransfer.state import ServerState, load_state, save_state
from fedtransfer.transfer import (
    Full,
    HeadOnly,
    LastK,
    LocalBatchNorm,
    ParamPlan,
    PersonalHead,
    PretrainSpec,
    Rules,
    TransferPolicy,
    load_checkpoint,
    pretrain,
    save_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "IID",
    "AllClients",
    "ClientResult",
    "ClientTask",
    "Codec",
    "CompatibilityError",
    "ConfigError",
    "Digits",
    "Dirichlet",
    "FedTransferError",
    "FederatedDataset",
    "Float32",
    "Full",
    "HeadOnly",
    "LastK",
    "LocalBatchNorm",
    "LocalTraining",
    "MNIST5k",
    "Mean",
    "ParamPlan",
    "Payload",
    "PayloadError",
    "PersonalHead",
    "PlanError",
    "PretrainSpec",
    "QuantitySkew",
    "Recipe",
    "RoundReport",
    "Rules",
    "Runtime",
    "SerialRuntime",
    "ServerAdagrad",
    "ServerAdam",
    "ServerPipeline",
    "ServerSGD",
    "ServerState",
    "ServerYogi",
    "Shards",
    "SmallCNN",
    "TensorData",
    "TransferPolicy",
    "Uniform",
    "UpdateRejected",
    "client_update",
    "evaluate",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "federate",
    "fedyogi",
    "load_checkpoint",
    "load_state",
    "pretrain",
    "run_round",
    "save_checkpoint",
    "save_state",
]
