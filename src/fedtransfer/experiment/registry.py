"""The only place strings become types: ``kind:`` tags for every configurable component."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Any

from fedtransfer.client.drift import Dyn, Nova, Scaffold
from fedtransfer.client.ncm import NearestClassMean
from fedtransfer.client.objectives import Objective, Plain, Prox
from fedtransfer.client.personalization import Ditto, Rep
from fedtransfer.client.transforms import ErrorFeedback
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
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.factories import (
    ALGORITHM_SPECS,
    AlgorithmSpec,
    BabuThenHead,
    FedNcm,
    LpFt,
    Progressive,
    ScheduleSpec,
    StageList,
)
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
from fedtransfer.runtime import (
    AutoRuntime,
    ProcessRuntime,
    RayRuntime,
    Runtime,
    SerialRuntime,
    VectorizedRuntime,
)
from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.clipping import CenteredClipping, ClipNorm, NormBound
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
from fedtransfer.transfer.ranks import RankNarrow, RankPad, RankTrim
from fedtransfer.types import StartStep

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
    },
    AlgorithmSpec: dict(ALGORITHM_SPECS),
    ScheduleSpec: {
        "stages": StageList,
        "lp_ft": LpFt,
        "fedncm": FedNcm,
        "babu_then_head": BabuThenHead,
        "progressive": Progressive,
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
        "clip_norm": ClipNorm,
        "sgd": ServerSGD,
        "adam": ServerAdam,
        "yogi": ServerYogi,
        "adagrad": ServerAdagrad,
        "error_feedback": ErrorFeedback,
        "rank_trim": RankTrim,
        "rank_pad": RankPad,
    },
    StartStep: {"rank_narrow": RankNarrow},
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


# --- runtimes (``--runtime NAME``) -------------------------------------------------------------


RUNTIMES: dict[str, type] = {
    "serial": SerialRuntime,
    "process": ProcessRuntime,
    "ray": RayRuntime,
    "vectorized": VectorizedRuntime,
    "auto": AutoRuntime,
}
"""Runtime name (the CLI's ``--runtime``) → runtime class."""

_POOL_SIZE: dict[type, str] = {ProcessRuntime: "workers", RayRuntime: "num_actors"}
"""The runtimes that run on workers, and the argument that says how many."""

POOLED_RUNTIMES: tuple[str, ...] = tuple(n for n, c in RUNTIMES.items() if c in _POOL_SIZE)
"""The runtime names that take ``workers`` (and ``threads`` per worker)."""


@contextlib.contextmanager
def runtime(
    name: str, *, workers: int | None = None, threads: int | None = None
) -> Iterator[Runtime]:
    """The runtime called ``name`` (a key of :data:`RUNTIMES`), its workers stopped when the
    block ends. ``workers`` is how many worker processes or Ray actors (default: usable CPUs /
    threads) and ``threads`` their torch threads; the in-process runtimes run on the caller's
    threads, so they take no ``workers`` and ignore ``threads``.

    >>> with runtime("serial") as rt:
    ...     rt
    SerialRuntime()
    """
    cls = RUNTIMES.get(name)
    if cls is None:
        near = difflib.get_close_matches(str(name), RUNTIMES, n=1)
        hint = f"did you mean {near[0]!r}?" if near else "pick one of the names"
        raise ConfigError(
            f"runtime: unknown runtime {name!r}; expected one of {list(RUNTIMES)}; hint: {hint}"
        )
    size = _POOL_SIZE.get(cls)
    if size is None:
        if workers is not None:
            raise ConfigError(
                f"runtime {name!r}: runs in this process, so it takes no workers (got "
                f"workers={workers}); hint: workers need one of {list(POOLED_RUNTIMES)}"
            )
        yield cls()
        return
    with cls(**{size: workers, "threads": threads}) as pool:
        yield pool
