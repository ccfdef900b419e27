"""The pre-training stage: centralised training on a source dataset, saved with provenance."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fedtransfer import tree
from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.train import LocalTraining, local_train
from fedtransfer.data.augment import RandomAffine
from fedtransfer.data.federated import TensorData
from fedtransfer.seeding import derive_seed, generator, global_cpu_seed
from fedtransfer.transfer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtransfer.transfer.policies import Full

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSpec:
    """How to pre-train: the local-training spec applied centrally, augmentation, a holdout."""

    training: LocalTraining = field(
        default_factory=lambda: LocalTraining(optimizer="adam", lr=1e-3, epochs=10, batch_size=64)
    )
    augment: RandomAffine | None = field(default_factory=RandomAffine)
    holdout_fraction: float = 0.1


def pretrain(
    model: nn.Module,
    source: TensorData,
    *,
    spec: PretrainSpec,
    seed: int,
    out_dir: str | os.PathLike[str],
    provenance: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Checkpoint:
    """Train ``model`` on ``source`` centrally and write a verified checkpoint to ``out_dir``.

    A seeded ``holdout_fraction`` of the source is kept aside to report source accuracy. The
    checkpoint's provenance records the source (and the sha256 of its tensors), the spec, the
    seed, the metrics and the weights' sha256.
    """
    began = time.perf_counter()
    order = torch.randperm(len(source), generator=generator(seed, "pretrain-holdout"))
    n_hold = round(spec.holdout_fraction * len(source))
    holdout, train = source.subset(order[:n_hold]), source.subset(order[n_hold:])
    plan = Full().plan(model)
    with global_cpu_seed(derive_seed(seed, "pretrain-torch")):
        fit = local_train(
            model,
            plan,
            train,
            spec.training,
            generator=generator(seed, "pretrain-batches"),
            augment=spec.augment,
        )
    metrics = {"train_loss": fit["loss"], "steps": fit["steps"]}
    if n_hold:
        held = evaluate(model, holdout)
        metrics |= {"holdout_accuracy": held["accuracy"], "holdout_loss": held["loss"]}
    metrics["seconds"] = time.perf_counter() - began
    log.info("pre-training done: %s", metrics)
    record = {
        **(provenance or {}),
        "seed": seed,
        "spec": asdict(spec),
        "examples": {"train": len(train), "holdout": n_hold},
        "source_sha256": tree.sha256({"x": source.x, "y": source.y}),
        "metrics": metrics,
    }
    save_checkpoint(out_dir, model.state_dict(), provenance=record)
    return load_checkpoint(out_dir)
