"""The only place strings become types: ``kind:`` tags for every configurable component."""

from __future__ import annotations

from typing import Any

from fedtransfer.client.drift import Dyn, Nova, Scaffold
from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.client.objectives import Objective, Plain, Prox
from fedtransfer.client.personalization import Ditto, Rep
from fedtransfer.client.transforms import ClientTransform, ErrorFeedback
from fedtransfer.codecs import BFloat16, Codec, Exact, Float16, Float32, Int8, TopK
from fedtransfer.data.bundled import Digits, MNIST5k, Source
from fedtransfer.data.datasets import (
    AgNews,
    Cifar10,
    Femnist,
    HFDataset,
    MnistIdx,
    Sst2,
    TextSource,
)
from fedtransfer.data.partition import IID, Dirichlet, Natural, Partitioner, QuantitySkew, Shards
from fedtransfer.models import CNN, LeafCNN, ModelFactory
from fedtransfer.models.external import HFSequenceClassifier, TimmModel, TorchvisionModel
from fedtransfer.models.resnet import CifarResNetFactory
from fedtransfer.models.text import MiniLM, Tokenized
from fedtransfer.robustness.attacks import (
    ALIE,
    IPM,
    Attack,
    GaussianAttack,
    LabelFlip,
    Scale,
    SignFlip,
)
from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.clipping import CenteredClipping, NormBound
from fedtransfer.server.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
    UpdateTransform,
)
from fedtransfer.server.robust import Bulyan, Krum, Median, MultiKrum, TrimmedMean
from fedtransfer.server.sample import AllClients, Sampler, Uniform
from fedtransfer.transfer.lora import Lora
from fedtransfer.transfer.peft import PeftAdapters
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import (
    FrozenHead,
    Full,
    GlobalHead,
    HeadOnly,
    LastK,
    LocalBatchNorm,
    PersonalHead,
    Rules,
)
from fedtransfer.transfer.schedule import Stages

GROUPS: dict[Any, dict[str, type]] = {
    TransferPolicy: {
        "full": Full,
        "head_only": HeadOnly,
        "last_k": LastK,
        "local_batchnorm": LocalBatchNorm,
        "personal_head": PersonalHead,
        "global_head": GlobalHead,
        "frozen_head": FrozenHead,
        "rules": Rules,
        "lora": Lora,
        "peft_adapters": PeftAdapters,
        "stages": Stages,
    },
    Aggregator: {
        "mean": Mean,
        "median": Median,
        "trimmed_mean": TrimmedMean,
        "krum": Krum,
        "multikrum": MultiKrum,
        "bulyan": Bulyan,
        "centered_clipping": CenteredClipping,
        "norm_bound": NormBound,
    },
    UpdateTransform: {
        "sgd": ServerSGD,
        "adam": ServerAdam,
        "yogi": ServerYogi,
        "adagrad": ServerAdagrad,
    },
    Codec: {
        "float32": Float32,
        "exact": Exact,
        "float16": Float16,
        "bfloat16": BFloat16,
        "int8": Int8,
        "topk": TopK,
    },
    Sampler: {"uniform": Uniform, "all": AllClients},
    Source: {
        "digits": Digits,
        "mnist5k": MNIST5k,
        "femnist": Femnist,
        "mnist_idx": MnistIdx,
        "cifar10": Cifar10,
        "tokenized": Tokenized,
    },
    TextSource: {"ag_news": AgNews, "sst2": Sst2, "hf_dataset": HFDataset},
    Partitioner: {
        "iid": IID,
        "dirichlet": Dirichlet,
        "shards": Shards,
        "quantity_skew": QuantitySkew,
        "natural": Natural,
    },
    ModelFactory: {
        "cnn": CNN,
        "leaf_cnn": LeafCNN,
        "minilm": MiniLM,
        "cifar_resnet": CifarResNetFactory,
        "hf_classifier": HFSequenceClassifier,
        "timm": TimmModel,
        "torchvision": TorchvisionModel,
    },
    Objective: {
        "plain": Plain,
        "prox": Prox,
        "scaffold": Scaffold,
        "dyn": Dyn,
        "nova": Nova,
        "ditto": Ditto,
        "rep": Rep,
        "ncm": NearestClassMean,
    },
    ClientTransform: {"error_feedback": ErrorFeedback},
    Attack: {
        "sign_flip": SignFlip,
        "scale": Scale,
        "gaussian": GaussianAttack,
        "label_flip": LabelFlip,
        "alie": ALIE,
        "ipm": IPM,
    },
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
