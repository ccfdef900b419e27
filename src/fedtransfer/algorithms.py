"""Recipe factories for named algorithms: compositions of components, never subclasses."""

from __future__ import annotations

from fedtransfer.client.train import LocalTraining
from fedtransfer.recipe import Recipe
from fedtransfer.server.optimizers import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi
from fedtransfer.server.pipeline import ServerPipeline
from fedtransfer.server.sample import Uniform
from fedtransfer.transfer.policies import Full
from fedtransfer.transfer.policy import TransferPolicy


def fedavg(
    policy: TransferPolicy | None = None,
    *,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAvg (McMahan et al., arXiv 1602.05629): weighted mean of updates, server lr 1.

    >>> fedavg().pipeline.post
    (ServerSGD(lr=1.0, momentum=0.0),)
    """
    return _recipe(policy, local, clients_per_round, ServerSGD())


def fedavgm(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAvgM (Hsu et al., arXiv 1909.06335): FedAvg with server momentum."""
    return _recipe(policy, local, clients_per_round, ServerSGD(lr=lr, momentum=momentum))


def fedadam(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAdam (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, local, clients_per_round, ServerAdam(lr=lr, tau=tau))


def fedyogi(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedYogi (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, local, clients_per_round, ServerYogi(lr=lr, tau=tau))


def fedadagrad(
    policy: TransferPolicy | None = None,
    *,
    lr: float = 0.01,
    tau: float = 1e-3,
    local: LocalTraining | None = None,
    clients_per_round: int = 10,
) -> Recipe:
    """FedAdagrad (Reddi et al., arXiv 2003.00295)."""
    return _recipe(policy, local, clients_per_round, ServerAdagrad(lr=lr, tau=tau))


def _recipe(
    policy: TransferPolicy | None,
    local: LocalTraining | None,
    clients_per_round: int,
    server_step: ServerSGD | ServerAdam | ServerYogi | ServerAdagrad,
) -> Recipe:
    return Recipe(
        policy=policy or Full(),
        local=local or LocalTraining(),
        pipeline=ServerPipeline(post=(server_step,)),
        sampler=Uniform(clients_per_round),
    )
