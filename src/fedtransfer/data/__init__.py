"""Federated data: sources, seeded partitioners, per-client splits and partition statistics."""

from fedtransfer.data.bundled import Digits, MNIST5k
from fedtransfer.data.federated import FederatedDataset, TensorData, federate
from fedtransfer.data.lazy import LazySplit, open_lazy_population, write_lazy_population
from fedtransfer.data.partition import (
    IID,
    Dirichlet,
    QuantitySkew,
    Shards,
    dirichlet,
    iid,
    quantity_skew,
    shards,
)

__all__ = [
    "IID",
    "Digits",
    "Dirichlet",
    "FederatedDataset",
    "LazySplit",
    "MNIST5k",
    "QuantitySkew",
    "Shards",
    "TensorData",
    "dirichlet",
    "federate",
    "iid",
    "open_lazy_population",
    "quantity_skew",
    "shards",
    "write_lazy_population",
]
