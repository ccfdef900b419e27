"""The only place strings become types: ``kind:`` tags for every configurable component."""

from __future__ import annotations

from typing import Any

from fedtransfer.codecs import Codec, Exact, Float32
from fedtransfer.data.partition import IID, Dirichlet, Partitioner, QuantitySkew, Shards
from fedtransfer.data.sources import Digits, MNIST5k, Source
from fedtransfer.models import CNN, ModelFactory
from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)
from fedtransfer.server.sample import AllClients, Sampler, Uniform
from fedtransfer.transfer.policies import Full, HeadOnly, LastK, LocalBatchNorm, PersonalHead, Rules
from fedtransfer.transfer.policy import TransferPolicy

GROUPS: dict[Any, dict[str, type]] = {
    TransferPolicy: {
        "full": Full,
        "head_only": HeadOnly,
        "last_k": LastK,
        "local_batchnorm": LocalBatchNorm,
        "personal_head": PersonalHead,
        "rules": Rules,
    },
    Aggregator: {"mean": Mean},
    UpdateTransform: {
        "sgd": ServerSGD,
        "adam": ServerAdam,
        "yogi": ServerYogi,
        "adagrad": ServerAdagrad,
    },
    Codec: {"float32": Float32, "exact": Exact},
    Sampler: {"uniform": Uniform, "all": AllClients},
    Source: {"digits": Digits, "mnist5k": MNIST5k},
    Partitioner: {
        "iid": IID,
        "dirichlet": Dirichlet,
        "shards": Shards,
        "quantity_skew": QuantitySkew,
    },
    ModelFactory: {"cnn": CNN},
}


def kinds(group: Any) -> dict[str, type]:
    """``kind`` → class for a protocol group."""
    return GROUPS[group]


def kind_of(cls: type) -> str | None:
    """The ``kind`` tag of a registered class, or None."""
    for table in GROUPS.values():
        for kind, registered in table.items():
            if registered is cls:
                return kind
    return None


def group_of(cls: type) -> Any | None:
    """The protocol group a registered class belongs to, or None."""
    for group, table in GROUPS.items():
        if cls in table.values():
            return group
    return None
