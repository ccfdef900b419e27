"""The server side: update validation, aggregators, server optimisers and their pipeline."""

from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.clipping import CenteredClipping, ClipNorm, NormBound
from fedtransfer.server.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.robust import Bulyan, Krum, Median, MultiKrum, TrimmedMean
from fedtransfer.server.sample import AllClients, Uniform
from fedtransfer.server.validate import UpdateLimits, validate_update

__all__ = [
    "Aggregator",
    "AllClients",
    "Bulyan",
    "CenteredClipping",
    "ClipNorm",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NormBound",
    "ServerAdagrad",
    "ServerAdam",
    "ServerPipeline",
    "ServerSGD",
    "ServerYogi",
    "TrimmedMean",
    "Uniform",
    "UpdateLimits",
    "UpdateTransform",
    "validate_update",
]
