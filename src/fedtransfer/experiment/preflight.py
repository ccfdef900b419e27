"""The checks of an experiment that can run before pre-training, run then: a bad setting is a
:class:`~fedtransfer.errors.ConfigError` naming it, before any minute is spent training."""

from __future__ import annotations

import torch

from fedtransfer.data.federated import FederatedDataset
from fedtransfer.errors import CompatibilityError, ConfigError, FedTransferError
from fedtransfer.experiment.schema import ExperimentConfig
from fedtransfer.recipe import Recipe


def preflight(cfg: ExperimentConfig, population: FederatedDataset) -> None:
    """Everything that can be checked before pre-training, checked then: the model builds
    and has an output for every label; every arm's schedule validates on it, its sampler
    draws a cohort from this population, and its aggregator accepts a cohort of that size
    (Krum's ``f`` …) — each failure a :class:`ConfigError` naming the arm."""
    _check_classes(cfg, population)
    for i, arm in enumerate(cfg.arms):
        if arm.mode != "federated":
            continue
        schedule = cfg.schedule_of(arm)
        try:
            schedule.validate(cfg.model(), population=population.clients)
            for _, recipe in schedule.stages:
                cohort = recipe.sampler.sample(list(population.clients), seed=cfg.seed, round=1)
                _dry_aggregate(recipe, len(cohort))
        except FedTransferError as exc:
            raise ConfigError(f"arms.{i} ({arm.name}): {exc}") from None


def _dry_aggregate(recipe: Recipe, cohort: int) -> None:
    """The recipe's aggregator on ``cohort`` small zero updates: what it asks of the number
    of updates (Krum's ``n >= 2f + 3`` …) does not depend on their size."""
    zeros = {"w": torch.zeros(2)}
    aggregator = recipe.pipeline.aggregator
    try:
        aggregator.aggregate([zeros] * cohort, [1.0] * cohort, aggregator.init(zeros))
    except FedTransferError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"aggregator: {aggregator!r} cannot aggregate the {cohort} updates of a round "
            f"({recipe.sampler!r}): {exc}"
        ) from None


def _check_classes(cfg: ExperimentConfig, population: FederatedDataset) -> None:
    """The model must build, run on the data and have an output for every label it holds."""
    sample = population.train[population.clients[0]].x[:1]
    try:
        model = cfg.model()
        model.eval()
        outputs = int(model(sample).shape[-1])
    except FedTransferError:
        raise
    except Exception as exc:  # a model factory's own error: a setting it cannot build with
        raise ConfigError(
            f"model: {cfg.model!r} cannot be built or run on the data's inputs "
            f"(shape {list(sample.shape[1:])}): {exc!r}"
        ) from None
    if outputs < population.num_classes:
        raise CompatibilityError(
            f"model: {cfg.model!r} has {outputs} outputs but the data has labels 0.."
            f"{population.num_classes - 1}; hint: set model.num_classes={population.num_classes}"
        )
